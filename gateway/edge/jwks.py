"""JSON Web Key Sets: fetching one and taking the keys this gateway can use from it.

Everything an identity provider sends ends as `JwksError` (a `ValueError`) or
the client's own errors: a document that is not an object, `keys` that is not
a list, keys PyJWT cannot load (skipped, as PyJWT's `PyJWKSet` does), a body
over `JWKS_MAX_BYTES`. The caller (`auth.Authorizer`) caches, rate-limits
refreshes and turns failures into 503s.
"""

from __future__ import annotations

import json

import aiohttp
import jwt

# A JWKS fetch that takes longer than this holds up subscribers; fail it instead.
JWKS_TIMEOUT_SECONDS = 5.0
# Real key sets are a few KiB (a handful of keys, certificate chains included); a body far
# larger is a broken or hostile identity provider, and it would be held in memory whole.
JWKS_MAX_BYTES = 256 * 1024


class JwksError(ValueError):
    """A JWKS document (or answer) the gateway cannot take keys from."""


async def fetch_keys(session: aiohttp.ClientSession, url: str) -> dict[str, jwt.PyJWK]:
    """GET a JWKS and return its usable keys by kid; raises JwksError, aiohttp's errors,
    TimeoutError, ValueError (bad JSON) or RecursionError (JSON nested too deep)."""
    timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT_SECONDS)
    async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
        if resp.status != 200:
            raise JwksError(f"status {resp.status}")
        body = await _read_at_most(resp, JWKS_MAX_BYTES)
    return usable_keys(json.loads(body))


def usable_keys(document: object) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS document by kid; a set with no keys is valid and simply empty.

    Keys this gateway cannot load are skipped, as PyJWT's own `PyJWKSet` does (a provider
    may publish key types it does not need); a set of only such keys is an error.
    """
    if not isinstance(document, dict):
        raise JwksError("not a JSON object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise JwksError('"keys" is not a list')
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        key = _jwk(entry)
        if key is not None:
            keys[key.key_id or ""] = key
    if entries and not keys:
        raise JwksError("none of its keys can be used")
    return keys


def _jwk(entry: object) -> jwt.PyJWK | None:
    # PyJWK raises more than its own errors: a list where a string belongs is a TypeError
    # (it looks fields up in dicts and sets), an "oct" key without "k" a KeyError.
    if not isinstance(entry, dict) or any(
        not isinstance(entry.get(name, ""), str) for name in ("kty", "alg", "kid", "crv")
    ):
        return None
    try:
        return jwt.PyJWK(entry)
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise JwksError(f"over {limit} bytes")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:  # counted after decompression: no gzip bomb either
            raise JwksError(f"over {limit} bytes")
    return bytes(body)
