"""TLS: the `ssl.SSLContext`s of the HTTPS listener and of requests to https:// upstreams.

This module owns turning the certificate, key and CA file paths that `config`
found readable into contexts: `server_context` for the main listener and
`client_context` for one route's upstream requests. Loading them reads and
parses files, so it lives here rather than in `config`, which only reads and
validates settings. Errors name the files, never their contents: a private
key must not reach a log line. An encrypted key is refused with a clear
error instead of letting OpenSSL prompt for a passphrase on a terminal.

Both sides require TLS 1.2 or newer: TLS 1.0 and 1.1 are deprecated
(RFC 8996), lack modern AEAD cipher suites, and every client that can run
EventSource speaks TLS 1.2.
"""

from __future__ import annotations

import functools
import ssl
from typing import NoReturn

from .config import RouteConfig, ServerConfig

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# Client contexts are built once per distinct (CA, cert, key) and shared by every request of
# every route naming those files. Bounded so reloads that change paths cannot grow it forever.
_CLIENT_CACHE_SIZE = 64


class TLSError(ValueError):
    """A TLS setting or file that cannot be used; the message names files, never contents."""


def _no_passphrase(what: str, path: str) -> NoReturn:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on a tty.
    raise TLSError(f"{what} {path!r} is encrypted; give an unencrypted key (restrict its mode)")


def _load_cert_chain(context: ssl.SSLContext, what: str, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key, password=lambda: _no_passphrase(what, key))
    except OSError as exc:  # ssl.SSLError included; its text is OpenSSL's, never key bytes
        raise TLSError(f"cannot load certificate {cert!r} with key {key!r}: {exc}") from None


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The main listener's context, or None (plain HTTP) when no certificate is configured."""
    cert, key = config.tls_cert_file, config.tls_key_file
    if not cert and not key:
        return None
    if not cert or not key:
        given, missing = (
            ("tls_cert_file", "tls_key_file") if cert else ("tls_key_file", "tls_cert_file")
        )
        raise TLSError(f"[server] {given} is set but {missing} is not: HTTPS needs both")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(["http/1.1"])  # aiohttp serves HTTP/1.1 only
    _load_cert_chain(context, "[server] tls_key_file", cert, key)
    return context


def client_context(route: RouteConfig) -> ssl.SSLContext | bool:
    """The `ssl=` argument for the route's upstream requests.

    True (aiohttp's default: verify against the system CAs) unless the route names a CA bundle
    or a client certificate and its upstream is https://; otherwise a cached, verifying
    context. Raises TLSError (a ValueError) when a file cannot be loaded.
    """
    if not route.upstream.startswith("https://") or not (
        route.upstream_ca_file or route.upstream_client_cert_file
    ):
        return True
    return _client_context(
        route.upstream_ca_file, route.upstream_client_cert_file, route.upstream_client_key_file
    )


@functools.lru_cache(maxsize=_CLIENT_CACHE_SIZE)
def _client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    try:
        # Purpose.SERVER_AUTH: CERT_REQUIRED and hostname checking on; system CAs when no cafile.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except OSError as exc:
        raise TLSError(f"cannot load upstream_ca_file {ca!r}: {exc}") from None
    context.minimum_version = MINIMUM_VERSION
    if cert:
        if not key:
            raise TLSError(f"upstream_client_cert_file {cert!r} needs upstream_client_key_file")
        _load_cert_chain(context, "upstream_client_key_file", cert, key)
    return context
