"""Event ids on the wire: what the gateway sends, it accepts back.

A browser's EventSource sends the last id it received as `Last-Event-ID` when
it reconnects, and the gateway refuses (400) an id that is too long, holds a
control character or is not UTF-8; a 400 makes EventSource stop for good. So
an upstream id the gateway would refuse is never forwarded as it is: it is
replaced by a short gateway id derived from it, `"~"` + 20 base64url
characters of a BLAKE2b digest. The replacement is a pure function of the id,
so every copy of one event (the topic's live copy, a catch-up's copy) gets the
same wire id and the ring matches them.

Dropping such an id instead would leave the browser on the previous id and
replay this event a second time; forwarding it cannot work, since neither
aiohttp nor browsers carry an 8 KiB header or a control character in a header.

An id with leading or trailing spaces or tabs is replaced too: browsers (Fetch
header normalisation) and aiohttp strip them from a header value, so it would
come back as another id and resume from the wrong place.

`acceptable` is the one rule the door (`edge.policy.client_last_event_id`) and
the sending side share, so they can never disagree.
"""

from __future__ import annotations

import base64
import hashlib
import re

# `[limits] max_last_event_id_bytes`' default: far above any real id (counters, UUIDs,
# timestamps, stream offsets), far below aiohttp's 8,190-byte header line limit.
DEFAULT_MAX_ID_BYTES = 1024
# 15 bytes: 120 bits, so two distinct ids of one topic colliding is out of reach, and a
# multiple of 3 so base64 needs no padding (20 characters).
DEFAULT_DIGEST_BYTES = 15
# Marks a gateway id in logs and in a client's Last-Event-ID; an upstream id may begin with
# it too, which is harmless: the replacement is only ever compared as a whole string.
REPLACED_PREFIX = "~"

# What an id may not hold: the encoder refuses CR/LF/NUL, and other controls cannot be
# sent back as a header value (tab is allowed inside, as HTTP allows it).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# HTTP's optional whitespace, stripped from both ends of every header value.
_EDGE_WHITESPACE = " \t"


def acceptable(event_id: str, max_bytes: int) -> str | None:
    """None when `event_id` may be sent and accepted back as it is, else why not.

    The reason completes "Last-Event-ID ...", e.g. "is longer than 1024 bytes".
    """
    try:
        size = len(event_id.encode())
    except UnicodeEncodeError:
        # Lone surrogates: aiohttp hands header bytes that are not UTF-8 over as such.
        return "is not valid UTF-8"
    if size > max_bytes:
        return f"is longer than {max_bytes} bytes"
    if _CONTROL.search(event_id):
        return "holds a control character"
    return None


def returns_intact(event_id: str, max_bytes: int) -> bool:
    """True when a client that received `event_id` sends back exactly `event_id`."""
    if acceptable(event_id, max_bytes) is not None:
        return False
    return event_id == event_id.strip(_EDGE_WHITESPACE)


def replacement(event_id: str) -> str:
    """The gateway id that stands for `event_id`: deterministic, 21 ASCII characters."""
    digest = hashlib.blake2b(
        event_id.encode("utf-8", "surrogatepass"), digest_size=DEFAULT_DIGEST_BYTES
    ).digest()
    return REPLACED_PREFIX + base64.urlsafe_b64encode(digest).decode("ascii")


_REPLACEMENT = re.compile(
    re.escape(REPLACED_PREFIX) + f"[A-Za-z0-9_-]{{{DEFAULT_DIGEST_BYTES * 4 // 3}}}"
)


def is_replacement(event_id: str) -> bool:
    """True if `event_id` has the form of a gateway id (`replacement`): no upstream knows it."""
    return _REPLACEMENT.fullmatch(event_id) is not None


def wire_id(event_id: str, max_bytes: int) -> str:
    """The id to send for an upstream id: itself when it comes back intact, else its
    replacement. "" (the upstream resetting the id) is sent as it is."""
    if returns_intact(event_id, max_bytes):
        return event_id
    # Cut only under a limit below 21 bytes, which no real deployment sets: what is sent
    # must still pass the door, at the cost of a likelier collision.
    return replacement(event_id)[:max_bytes]
