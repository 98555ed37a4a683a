"""Access log lines: one per finished stream, one per refused request.

Plain `key=value` text (values quoted when needed, control characters escaped,
so a hostile path cannot forge a line) or JSON lines, chosen by
`[server] access_log`. Lines carry no secrets: no headers, no query strings
(they may carry tokens), only the raw path, truncated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

log = logging.getLogger("gateway.access")

_PLAIN = re.compile(r"[A-Za-z0-9._:/\[\]@-]+")


class AccessLog:
    __slots__ = ("format",)

    def __init__(self, format: str) -> None:
        self.format = format

    def write(self, kind: str, fields: Mapping[str, object]) -> None:
        if self.format == "off" or not log.isEnabledFor(logging.INFO):
            return
        if self.format == "json":
            log.info("%s", json.dumps({"kind": kind, **fields}, separators=(",", ":")))
        else:
            log.info("%s %s", kind, " ".join(f"{k}={_text(v)}" for k, v in fields.items()))


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)
