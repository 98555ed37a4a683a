"""Guard against the benchmark rotting: a ~3 s side-by-side run against the gateway only.

Not a timing test: it checks that `python -m bench.compare` still starts the upstream and the
gateway, connects every subscriber, sees the events arrive, and reports them as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.process


@pytest.mark.timeout(180)
def test_compare_runs_against_the_gateway(tmp_path: Path) -> None:
    out = tmp_path / "compare.jsonl"
    argv = [sys.executable, "-m", "bench.compare", "--scenario", "fanout", "--targets", "gateway"]
    argv += ["--subscribers", "20", "--duration", "3", "--log-dir", str(tmp_path / "logs")]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150, check=False)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "subscribers connected" in done.stdout, report
    lines = out.read_text().splitlines()
    assert len(lines) == 1, report
    result = json.loads(lines[0])
    assert result["target"] == "gateway"
    assert result.get("error") is None, report
    assert result["connected"] == 20, report
    assert result["no_first_event"] == 0, report
    assert result["delivery_ratio"] > 0.9, report
    assert result["duplicate_events"] == 0, report
    assert result["upstream_connections"] == 1, report
