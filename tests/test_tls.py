"""TLS: the HTTPS listener, verified https:// upstreams and mTLS, with a throwaway CA (trustme)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from gateway.config import from_document
from gateway.sse import Event, encode_many
from gateway.tls import TLSError, client_context, server_context

from .conftest import GatewayFactory
from .support import Changes, LogWatcher, Upstream, connect, events, free_port, gateway_process

CLIENT_IDENTITY = "client.example"


@dataclasses.dataclass(frozen=True)
class PKI:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as files."""

    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    encrypted_key: str  # the server key under a passphrase

    def trusting(self) -> ssl.SSLContext:
        """A client context that trusts the test CA (and nothing else), offering ALPN."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.set_alpn_protocols(["http/1.1"])
        return context

    def key_material(self) -> list[str]:
        """Every base64 line of every private key: none may ever appear in a log."""
        lines = []
        for path in (self.server_key, self.client_key, self.encrypted_key):
            text = Path(path).read_text()
            lines += [line for line in text.splitlines() if line and "-----" not in line]
        return lines


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert(CLIENT_IDENTITY)
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    for name, leaf in (("server", server), ("client", client)):
        cert = root / f"{name}.crt"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(root / f"{name}.key"))
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), None)
    (root / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    for path in root.glob("*.key"):
        path.chmod(0o600)
    return PKI(
        ca_file=str(root / "ca.pem"),
        server_cert=str(root / "server.crt"),
        server_key=str(root / "server.key"),
        client_cert=str(root / "client.crt"),
        client_key=str(root / "client.key"),
        encrypted_key=str(root / "encrypted.key"),
    )


def assert_no_key_material(pki: PKI, lines: Iterable[str]) -> None:
    text = "\n".join(lines)
    assert "PRIVATE KEY" not in text
    leaked = [line for line in pki.key_material() if line in text]
    assert not leaked, "private key material in the log"


# --- the gateway's own listener over HTTPS (the real process) -------------------------


def write_config(path: Path, port: int, upstream_url: str, cert: str, key: str) -> str:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"

[[routes]]
name = "r"
path = "/events/{{topic}}"
upstream = "{upstream_url}"
linger_seconds = 0
"""
    )
    return str(path)


@pytest.mark.process
async def test_gateway_listener_serves_https_and_refuses_plain_http_and_untrusting_clients(
    pki: PKI, upstream: Upstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "gateway.toml", port, upstream.url(), pki.server_cert, pki.server_key
    )
    args = ["--config", config, "--log-level", "debug"]
    async with gateway_process(args) as (proc, log):
        assert any(f"listening on https://127.0.0.1:{port}" in line for line in log.lines)
        connector = aiohttp.TCPConnector(ssl=pki.trusting())
        async with aiohttp.ClientSession(connector=connector) as trusting:
            client = await connect(trusting, f"https://127.0.0.1:{port}/events/x")
            ssl_object = client.response.connection.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
            assert ssl_object.selected_alpn_protocol() == "http/1.1"
            assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
            await upstream.wait_open("x")
            await upstream.publish("x", *events("x", 1, 2))
            assert await client.wait_events(2) == events("x", 1, 2)

            # Plain HTTP to the TLS port gets no HTTP answer.
            async with asyncio.timeout(5):
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        await resp.read()
            # A client that trusts only the system CAs refuses the gateway's certificate.
            async with asyncio.timeout(5):
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    async with session.get(f"https://127.0.0.1:{port}/healthz"):
                        pass
            # The stream over TLS was not disturbed by either.
            await upstream.publish("x", *events("x", 3, 1))
            assert await client.wait_events(3) == events("x", 1, 3)
            # A TLS client that leaves is seen gone: its topic's upstream closes.
            other = await connect(trusting, f"https://127.0.0.1:{port}/events/y")
            await upstream.wait_open("y")
            other.close()
            await upstream.wait_closed("y")

            proc.send_signal(signal.SIGTERM)
            await client.wait_end(timeout=10)
            # A clean end over TLS too: the chunked body was terminated, not cut.
            assert client.response.content.at_eof()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await log.until("stopped")
    # The key's path may be logged (it helps an operator); its contents never.
    assert any(pki.server_key in line for line in log.lines)
    assert_no_key_material(pki, log.lines)


async def run_to_exit(args: list[str], timeout: float = 15) -> tuple[int, list[str]]:
    """`python -m gateway` expected to fail at startup: its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    env["SSE_GATEWAY_METRICS_LISTEN"] = ""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdin=asyncio.subprocess.DEVNULL,  # an encrypted key must not prompt: nothing to read
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,  # no controlling terminal for OpenSSL to prompt on
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace").splitlines()


@pytest.mark.process
@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("client_key", "key values mismatch"),
        ("encrypted_key", "is encrypted"),
    ],
)
async def test_an_unusable_key_stops_startup_naming_the_files_not_their_contents(
    pki: PKI, upstream: Upstream, tmp_path: Path, key: str, message: str
) -> None:
    port = free_port()
    key_file = getattr(pki, key)
    config = write_config(
        tmp_path / "gateway.toml", port, upstream.url(), pki.server_cert, key_file
    )
    code, lines = await run_to_exit(["--config", config])
    assert code != 0
    assert not any("listening on" in line for line in lines)
    text = "\n".join(lines)
    assert message in text.lower()
    assert key_file in text
    assert_no_key_material(pki, lines)


def test_server_context_requires_cert_and_key_together(pki: PKI) -> None:
    base = from_document({"routes": [{"path": "/e/{t}", "upstream": "http://h/{t}"}]}, {}).server
    assert server_context(base) is None
    only_cert = dataclasses.replace(base, tls_cert_file=pki.server_cert, tls_key_file=None)
    with pytest.raises(TLSError, match="tls_cert_file is set but tls_key_file is not"):
        server_context(only_cert)
    only_key = dataclasses.replace(base, tls_cert_file=None, tls_key_file=pki.server_key)
    with pytest.raises(TLSError, match="tls_key_file is set but tls_cert_file is not"):
        server_context(only_key)
    both = dataclasses.replace(base, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    context = server_context(both)
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


# --- TLS to the upstream ---------------------------------------------------------------


class TLSUpstream:
    """A minimal SSE backend on a TLS socket; records the client certificate of each request."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.peers: list[Any] = []  # the client certificate (or None) of each request
        self.open: dict[str, set[web.StreamResponse]] = {}
        self.changes = Changes()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._done: set[asyncio.Future[None]] = set()

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/stream/{{topic}}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream/{topic}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for fut in self._done:
            if not fut.done():
                fut.set_result(None)
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peercert"))
        topic = request.match_info["topic"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": hello\n\n")
        self.open.setdefault(topic, set()).add(resp)
        self.changes.notify()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done.add(done)
        try:
            await done
        finally:
            self.open[topic].discard(resp)
            self._done.discard(done)
        return resp

    async def wait_open(self, topic: str, timeout: float = 5) -> None:
        await self.changes.until(lambda: bool(self.open.get(topic)), timeout)

    async def publish(self, topic: str, *published: Event) -> None:
        for resp in list(self.open.get(topic, ())):
            with contextlib.suppress(ConnectionResetError):
                await resp.write(encode_many(published))


def upstream_server_context(pki: PKI, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca_file)
    return context


@contextlib.asynccontextmanager
async def tls_upstream(context: ssl.SSLContext) -> AsyncIterator[TLSUpstream]:
    server = TLSUpstream(context)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def tls_route(name: str, upstream: TLSUpstream, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": f"/{name}/{{topic}}",
        "upstream": upstream.url(),
        "reconnect_initial_seconds": 0.05,
        "reconnect_max_seconds": 0.2,
        **options,
    }


async def wait_failure(log: LogWatcher, route: str) -> None:
    """The upstream client logs each failed attempt after counting it."""
    await log.until(lambda records: any(f"for route {route}:" in r for r in records))


async def test_https_upstream_is_verified_with_the_route_ca_not_the_system_cas(
    pki: PKI, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    async with tls_upstream(upstream_server_context(pki)) as backend:
        with LogWatcher("gateway") as log:
            gw = await make_gateway(
                tls_route("trusted", backend, upstream_ca_file=pki.ca_file),
                tls_route("system", backend),  # system CAs only: the test CA is unknown
            )
            trusted = await connect(session, gw.url("/trusted/x"))
            system = await connect(session, gw.url("/system/y"))
            await backend.wait_open("x")
            await backend.publish("x", *events("x", 1, 2))
            assert await trusted.wait_events(2) == events("x", 1, 2)

            await wait_failure(log, "system")
        failures = "sse_gateway_upstream_failures_total"
        assert gw.metric(failures, route="system", reason="connect") >= 1
        assert gw.metric(failures, route="trusted", reason="connect") == 0
        assert any("CERTIFICATE_VERIFY_FAILED" in r for r in log.records)
        assert "y" not in backend.open  # the unverified connection never reached a handler
        assert not system.ended  # the subscriber waits for the upstream to come right
        assert backend.peers == [None]  # no client certificate was configured or sent
        trusted.close()
        system.close()


async def test_mtls_upstream_refuses_a_route_without_a_client_certificate(
    pki: PKI, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    async with tls_upstream(upstream_server_context(pki, require_client_cert=True)) as backend:
        with LogWatcher("gateway") as log:
            gw = await make_gateway(
                tls_route("anon", backend, upstream_ca_file=pki.ca_file),
                tls_route(
                    "mtls",
                    backend,
                    upstream_ca_file=pki.ca_file,
                    upstream_client_cert_file=pki.client_cert,
                    upstream_client_key_file=pki.client_key,
                ),
                # Readable files that do not go together: a clear failure naming them.
                tls_route(
                    "mismatched",
                    backend,
                    upstream_ca_file=pki.ca_file,
                    upstream_client_cert_file=pki.client_cert,
                    upstream_client_key_file=pki.server_key,
                ),
            )
            anon = await connect(session, gw.url("/anon/a"))
            mtls = await connect(session, gw.url("/mtls/m"))
            mismatched = await connect(session, gw.url("/mismatched/k"))
            await backend.wait_open("m")
            await backend.publish("m", *events("m", 1, 2))
            assert await mtls.wait_events(2) == events("m", 1, 2)

            await wait_failure(log, "anon")
            await wait_failure(log, "mismatched")
        failures = "sse_gateway_upstream_failures_total"
        assert gw.metric(failures, route="anon", reason="connect") >= 1
        assert gw.metric(failures, route="mismatched", reason="connect") >= 1
        assert gw.metric(failures, route="mtls", reason="connect") == 0
        assert set(backend.open) == {"m"}
        # The upstream saw the configured client identity on the accepted connection.
        assert len(backend.peers) == 1
        assert ("DNS", CLIENT_IDENTITY) in backend.peers[0]["subjectAltName"]
        mismatch = next(r for r in log.records if "for route mismatched:" in r)
        assert pki.client_cert in mismatch
        assert pki.server_key in mismatch
        assert "key values mismatch" in mismatch
        assert_no_key_material(pki, log.records)
        for client in (anon, mtls, mismatched):
            client.close()


def test_client_contexts_are_cached_per_files_and_only_for_https(pki: PKI) -> None:
    def route(name: str, upstream: str, **options: str) -> dict[str, Any]:
        return {"name": name, "path": f"/{name}/{{t}}", "upstream": upstream, **options}

    mtls = {
        "upstream_ca_file": pki.ca_file,
        "upstream_client_cert_file": pki.client_cert,
        "upstream_client_key_file": pki.client_key,
    }
    doc = {
        "routes": [
            route("plain", "https://127.0.0.1:1/{t}"),
            route("a", "https://127.0.0.1:1/{t}", **mtls),
            route("b", "https://127.0.0.1:2/{t}", **mtls),
            route("ca", "https://127.0.0.1:1/{t}", upstream_ca_file=pki.ca_file),
            route("http", "http://127.0.0.1:1/{t}", **mtls),
        ]
    }
    plain, a, b, ca_only, http = from_document(doc, {}).routes
    assert client_context(plain) is True  # aiohttp's default: system CAs, verified
    assert client_context(http) is True  # TLS settings do not apply to http://
    context = client_context(a)
    assert isinstance(context, ssl.SSLContext)
    assert client_context(a) is context  # built once, not per request
    assert client_context(b) is context  # same files, same context
    with_ca = client_context(ca_only)
    assert isinstance(with_ca, ssl.SSLContext)
    assert with_ca is not context
    for built in (context, with_ca):
        assert built.verify_mode == ssl.CERT_REQUIRED
        assert built.check_hostname
        assert built.minimum_version == ssl.TLSVersion.TLSv1_2
