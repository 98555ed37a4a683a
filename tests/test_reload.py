"""SIGHUP's reload, in process: what it applies at once, and what it says needs a restart."""

from __future__ import annotations

import dataclasses
import json
import logging

import aiohttp

from gateway.app import reload

from .conftest import GatewayFactory, route_doc
from .support import LogWatcher, Upstream, connect


async def test_a_changed_access_log_format_applies_at_once(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream), server={"access_log": "text"})
    server = dataclasses.replace(gw.config.server, access_log="json")
    with LogWatcher("gateway.access") as access:
        reload(gw.app, dataclasses.replace(gw.config, server=server))
        async with session.get(gw.url("/nope")) as resp:
            assert resp.status == 404
        await access.until(lambda lines: len(lines) >= 1)
    line = json.loads(access.records[0])
    assert line["kind"] == "rejected"
    assert line["status"] == 404


async def test_a_changed_log_level_applies_at_once(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream), server={"log_level": "info"})
    root = logging.getLogger()
    before = root.level
    try:
        server = dataclasses.replace(gw.config.server, log_level="error")
        reload(gw.app, dataclasses.replace(gw.config, server=server))
        assert root.level == logging.ERROR
    finally:
        root.setLevel(before)


async def test_settings_a_reload_cannot_apply_are_named_in_a_warning(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream))
    limits = dataclasses.replace(gw.config.limits, max_header_bytes=4096)
    server = dataclasses.replace(gw.config.server, shutdown_timeout_seconds=30)
    with LogWatcher("gateway.app") as log:
        reload(gw.app, dataclasses.replace(gw.config, limits=limits, server=server))
        reload(gw.app, dataclasses.replace(gw.config, limits=limits, server=server))
    warnings = [x for x in log.records if "restart" in x]
    assert warnings == [
        "reload: [server] shutdown_timeout_seconds, [limits] max_header_bytes changed; "
        "these apply after a restart"
    ]


async def test_a_reload_that_lowers_the_id_limit_still_takes_back_ids_sent_before(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    live = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    long_id = "7" * 900  # within the 1,024-byte default: sent as it is
    await upstream.send("t", f"id: {long_id}\ndata: a\n\nid: 2\ndata: b\n\n".encode())
    await live.wait_events(2)
    assert live.events[0].id == long_id
    limits = dataclasses.replace(gw.config.limits, max_last_event_id_bytes=500)
    reload(gw.app, dataclasses.replace(gw.config, limits=limits))
    # The browser holding it reconnects: taken back (a 400 would stop it for good).
    back = await connect(session, gw.url("/events/t"), headers={"Last-Event-ID": long_id})
    assert [e.id for e in await back.wait_events(1)] == ["2"]
    # Ids sent from now on follow the new limit: a 900-byte one is replaced.
    await upstream.send("t", f"id: {'8' * 900}\ndata: c\n\n".encode())
    await live.wait_events(3)
    new_id = live.events[2].id
    assert new_id is not None
    assert new_id.startswith("~")
    assert len(new_id) == 21
    for client in (live, back):
        client.close()
