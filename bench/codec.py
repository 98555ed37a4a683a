"""Parse throughput of gateway.sse.Parser: 100k events of 200-byte data + id.

Usage: python -m bench.codec [CHUNK_BYTES] [crlf]   (default 4096-byte feeds, LF endings)
"""

import sys
import time

from gateway.sse import Parser

eol = b"\r\n" if "crlf" in sys.argv else b"\n"
size = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 4096
payload = b'{"n": 0, "pad": "' + b"x" * 181 + b'"}'
assert len(payload) == 200
stream = b"".join(b"data: " + payload + eol + b"id: %d" % i + eol + eol for i in range(100_000))
chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
best = float("inf")
for _ in range(7):
    parser = Parser()
    t0 = time.perf_counter()
    n = sum(len(parser.feed(c)) for c in chunks)
    best = min(best, time.perf_counter() - t0)
    assert n == 100_000
    assert parser.last_event_id == "99999"
print(
    f"eol={eol!r} chunk={size}: {len(stream) / 1e6:.1f} MB, 100k events in {best * 1e3:.0f} ms"
    f" = {100_000 / best:,.0f} events/s ({len(stream) / best / 1e6:.0f} MB/s)"
)
