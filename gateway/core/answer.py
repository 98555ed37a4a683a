"""What an upstream's answer to one request means to a client: the rule of "What reaches the
browser" (DESIGN.md, README), in one place. Plain ints, no HTTP library.

A browser's `EventSource` stops for good (readyState CLOSED) on any status but 200 or any
type but `text/event-stream` (WHATWG HTML, "processing the event stream": *fail the
connection*), and keeps reconnecting after a network error (*reestablish the connection*).
The gateway must leave a client in the state it would reach talking to the upstream
directly, except for what it exists to absorb (a shared topic's reconnects). So each
attempt's outcome is one of four kinds:

- `stream`: a 200 `text/event-stream` answer; the client gets 200 and the stream.
- `final`: the upstream's own "stop" (204, any 4xx, a redirect the gateway does not follow,
  a 2xx of another type, or another 2xx than 200, which EventSource fails too). Passed to
  the client as a status in both modes (with the upstream's Retry-After on a 429); a shared
  topic that gets one ends instead of retrying.
- `error`: a 5xx. A direct client gets 502/503/504 (a browser stops, as it would directly);
  a shared topic hides it, keeps its subscribers and retries.
- `unreachable`: no response head (refused, reset, timed out). A direct client's stream
  opens and ends at once, so it reconnects on its own schedule as after a network error
  talking directly; a shared topic hides it and retries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["stream", "final", "error", "unreachable"]
# What a client is told when the upstream redirects (the gateway never follows: the upstream's
# location comes from configuration) or answers a type EventSource refuses: a status a
# browser treats as final, as the browser talking directly would fail that connection too.
BAD_ANSWER_STATUS = 502
# An upstream that did not answer in time: the gateway's usual 504.
TIMEOUT_STATUS = 504
SSE_TYPE = "text/event-stream"
# A Retry-After worth passing on (RFC 9110): delay-seconds, or an HTTP-date (printable ASCII).
_RETRY_AFTER = re.compile(r"\d{1,9}|[A-Za-z]{3}, [0-9A-Za-z :]{1,40} GMT")


@dataclass(frozen=True, slots=True)
class Answer:
    """One attempt's outcome: `status` is what a client is answered (200: the stream)."""

    kind: Kind
    status: int
    # Short and safe to show a client: never the upstream's URL or body.
    reason: str = ""
    # The upstream's Retry-After on a 429 or 503, passed on with it.
    retry_after: str | None = None

    @property
    def final(self) -> bool:
        return self.kind == "final"


STREAM = Answer("stream", 200)


def of_response(status: int, content_type: str, retry_after: str | None = None) -> Answer:
    """The meaning of an upstream's response head (`retry_after`: its Retry-After header)."""
    if retry_after is not None and (
        status not in (429, 503) or not _RETRY_AFTER.fullmatch(retry_after)
    ):
        retry_after = None
    if status == 204:
        return Answer("final", 204, "the upstream has nothing to stream (204)")
    if 200 <= status < 300:
        if content_type.lower() != SSE_TYPE:
            return Answer(
                "final", BAD_ANSWER_STATUS, "the upstream did not answer with an SSE stream"
            )
        if status != 200:
            # EventSource fails the connection on any status but 200, even with the SSE type.
            return Answer("final", status, f"the upstream answered {status}, not 200")
        return STREAM
    if 300 <= status < 400:
        return Answer("final", BAD_ANSWER_STATUS, f"the upstream redirected ({status})")
    if 400 <= status < 500:
        return Answer("final", status, f"the upstream refused ({status})", retry_after)
    # 5xx (and anything else no upstream should send): a failure to pass on, not the upstream's
    # decision about this stream. 503 and 504 keep their meaning; the rest is a bad gateway.
    passed = status if status in (503, 504) else 502
    return Answer("error", passed, f"the upstream failed ({status})", retry_after)


def unreachable(timed_out: bool) -> Answer:
    """No response head: refused, reset, or not in `upstream_connect_timeout_seconds`."""
    if timed_out:
        return Answer("unreachable", TIMEOUT_STATUS, "the upstream did not answer in time")
    return Answer("unreachable", 502, "the upstream is unreachable")
