"""Embedding connic into a host aiohttp application with ``connic.setup``, and ``create_app``'s config forms."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import connic
from conftest import SECRET, Connect, StartServer, make_config

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def host_app() -> tuple[web.Application, list[str]]:
    """A host application with its own route and middleware; the list records what the middleware saw."""
    seen: list[str] = []

    @web.middleware
    async def stamp(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.path)
        response = await handler(request)
        if not response.prepared:
            response.headers["X-Host"] = "yes"
        return response

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "host", "query": dict(request.query)})

    app = web.Application(middlewares=[stamp])
    app.router.add_get("/hello", hello)
    return app, seen


async def get(url: str, **kwargs: object) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, **kwargs) as response,  # type: ignore[arg-type]
    ):
        return response.status, dict(response.headers), await response.text()


async def assert_echo(client, text: str = "embedded echo") -> None:  # type: ignore[no-untyped-def]
    frames = await client.reply({"id": "e1", "message": text})
    assert [f["type"] for f in frames][:2] == ["ack", "stream_start"], frames
    assert frames[0] == {"type": "ack", "id": "e1", "message_number": 1}
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == text, frames


async def test_setup_under_a_prefix(start_server: StartServer, connect: Connect) -> None:
    app, seen = host_app()
    sub = connic.setup(app, make_config(), prefix="/connic")
    assert isinstance(sub, web.Application) and sub is not app
    assert connic.RUNTIME in sub
    server = await start_server(app=app)

    # The host's own route works, with the host's middleware, and needs no secret.
    status, headers, body = await get(server.http + "/hello?x=1")
    assert status == 200 and headers.get("X-Host") == "yes"
    assert '"hello": "host"' in body

    # connic answers under the prefix.
    client = await connect(server.url("/connic/ws"))
    assert client.connected["agents"] == ["assistant"]  # type: ignore[attr-defined]
    await assert_echo(client)

    # connic's auth and limits never touch the host's routes.
    for _ in range(3):
        status, headers, _ = await get(server.http + "/hello", headers={"X-Connic-Secret": "wrong"})
        assert status == 200 and headers.get("X-Host") == "yes"

    # The connic path is not also at the root.
    status, _, _ = await get(server.http + "/ws")
    assert status == 404
    # A plain GET of the WebSocket endpoint is refused politely.
    status, _, _ = await get(server.http + "/connic/ws")
    assert status == 400

    # Auth still applies to connic's own endpoint.
    wrong = await connect(server.url("/connic/ws"), secret="wrong", expect_connected=False)
    assert (await wrong.closed())[0] == 4001
    assert "/hello" in seen


async def test_host_middleware_runs_for_the_sub_app_but_connic_never_touches_host_routes(
    start_server: StartServer, connect: Connect
) -> None:
    # aiohttp runs a parent's middleware for its sub-applications too (documented in docs/embedding.md);
    # what connic guarantees is the other direction: its auth and limits stay off the host's routes.
    app, seen = host_app()
    connic.setup(app, make_config(), prefix="/connic")
    server = await start_server(app=app)
    await get(server.http + "/hello")
    client = await connect(server.url("/connic/ws"))
    await assert_echo(client)
    assert seen == ["/hello", "/connic/ws"]


async def test_setup_with_a_trailing_slash_prefix(start_server: StartServer, connect: Connect) -> None:
    app, _ = host_app()
    connic.setup(app, make_config(), prefix="/chat/")
    server = await start_server(app=app)
    await assert_echo(await connect(server.url("/chat/ws")))


async def test_setup_at_the_root(start_server: StartServer, connect: Connect) -> None:
    app, seen = host_app()
    installed = connic.setup(app, make_config(), prefix=None)
    assert installed is app
    assert connic.RUNTIME in app
    server = await start_server(app=app)
    status, headers, _ = await get(server.http + "/hello")
    assert status == 200 and headers.get("X-Host") == "yes"
    client = await connect(server.url("/ws"))
    await assert_echo(client)
    # At the root, connic's routes are the host's routes: its middleware runs for them.
    assert "/ws" in seen


async def test_two_connic_instances_in_one_host(start_server: StartServer, connect: Connect) -> None:
    app, _ = host_app()
    connic.setup(app, make_config(), prefix="/one")
    connic.setup(app, make_config(agents={"other": {"use": "echo"}}), prefix="/two")
    server = await start_server(app=app)
    one = await connect(server.url("/one/ws"))
    two = await connect(server.url("/two/ws"))
    assert one.connected["agents"] == ["assistant"]  # type: ignore[attr-defined]
    assert two.connected["agents"] == ["other"]  # type: ignore[attr-defined]
    await assert_echo(one)
    await assert_echo(two)


@pytest.mark.parametrize("prefix", ["", "/", "//"])
def test_setup_with_an_empty_prefix_raises(prefix: str) -> None:
    app, _ = host_app()
    with pytest.raises(ValueError, match="prefix"):
        connic.setup(app, make_config(), prefix=prefix)


def test_setup_with_a_bad_config_raises_config_error() -> None:
    app, _ = host_app()
    with pytest.raises(connic.ConfigError, match=r"agents\.a\.use"):
        connic.setup(app, {"agents": {"a": {"use": "nosuch"}}, "connectors": [{"secrets": ["s"]}]})


async def test_host_shutdown_closes_connic_sockets_1001_promptly(start_server: StartServer, connect: Connect) -> None:
    # TestServer runs aiohttp with handler_cancellation=True: the handler is cancelled when
    # the socket closes, and the drain must not then wait for send_timeout.
    app, _ = host_app()
    connic.setup(app, make_config(), prefix="/connic")
    server = await start_server(app=app)
    client = await connect(server.url("/connic/ws"))
    await assert_echo(client)
    closing = asyncio.create_task(server.server.close())
    try:
        code, frames = await client.closed(timeout=10)
        assert [f["code"] for f in frames] == ["server_shutting_down"]
        assert code == 1001
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert closing in done, "the host application took longer than 5 s to shut down"
    finally:
        await asyncio.wait_for(closing, 40)


# --- two instances in one host: each runtime's own lifecycle -------------------------


def recording_registry(events: list[tuple[str, str]]) -> connic.Registry:
    """The installed plugins plus ``recorder``: an agent that records its start() and close() and answers its name."""

    class Recorder(connic.Agent):
        async def start(self) -> None:
            events.append(("start", self.name))

        async def close(self) -> None:
            events.append(("close", self.name))

        async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
            yield f"I am {self.name}"

    registry = connic.load_registry()
    registry.register("agents", "recorder", Recorder)
    return registry


async def answer(client) -> str:  # type: ignore[no-untyped-def]
    frames = await client.reply({"message": "who?"})
    assert frames[-1]["type"] == "stream_end", frames
    return str(frames[-1]["full_response"])


def root_config(name: str, *, own_paths: bool) -> dict[str, object]:
    """A recorder agent ``name``; with ``own_paths``, nothing that would collide with a second instance."""
    if not own_paths:
        return make_config(agents={name: {"use": "recorder"}})
    config = make_config(connector={"path": f"/{name}"}, agents={name: {"use": "recorder"}})
    return {**config, "server": {"playground": False, "metrics": False}}


@pytest.mark.parametrize("own_paths", [True, False], ids=["own_paths", "same_paths"])
async def test_second_setup_at_the_root_is_refused(
    start_server: StartServer, connect: Connect, own_paths: bool
) -> None:
    # With paths that do not collide, a second root setup used to be accepted, and then both
    # apps' lifecycle callbacks found the second runtime: "second" started twice, "first" never.
    events: list[tuple[str, str]] = []
    registry = recording_registry(events)
    app, _ = host_app()
    connic.setup(app, root_config("first", own_paths=own_paths), prefix=None, registry=registry)
    with pytest.raises(connic.ConfigError, match=r"already installed in this application; .*prefix"):
        connic.setup(app, root_config("second", own_paths=own_paths), prefix=None, registry=registry)
    # The refused call changed nothing: the first instance starts, serves and closes, once.
    server = await start_server(app=app)
    assert events == [("start", "first")]
    client = await connect(server.url("/first" if own_paths else "/ws"))
    assert client.connected["agents"] == ["first"]  # type: ignore[attr-defined]
    assert await answer(client) == "I am first"
    await server.server.close()
    assert events == [("start", "first"), ("close", "first")]


async def test_each_instance_starts_drains_and_closes_its_own_agents(
    start_server: StartServer, connect: Connect
) -> None:
    events: list[tuple[str, str]] = []
    registry = recording_registry(events)
    app, _ = host_app()
    connic.setup(app, make_config(agents={"root": {"use": "recorder"}}), prefix=None, registry=registry)
    connic.setup(app, make_config(agents={"one": {"use": "recorder"}}), prefix="/one", registry=registry)
    connic.setup(app, make_config(agents={"two": {"use": "recorder"}}), prefix="/two", registry=registry)
    server = await start_server(app=app)
    assert sorted(events) == [("start", "one"), ("start", "root"), ("start", "two")]
    clients = {
        name: await connect(server.url(path))
        for name, path in [("root", "/ws"), ("one", "/one/ws"), ("two", "/two/ws")]
    }
    for name, client in clients.items():
        assert await answer(client) == f"I am {name}"

    closing = asyncio.create_task(server.server.close())
    for client in clients.values():
        code, frames = await client.closed(timeout=10)
        assert [f["code"] for f in frames] == ["server_shutting_down"] and code == 1001, (code, frames)
    await asyncio.wait_for(closing, 40)
    assert sorted(events) == [("close", n) for n in ("one", "root", "two")] + [
        ("start", n) for n in ("one", "root", "two")
    ]


# --- create_app's configuration forms ------------------------------------------------

TOML = f"""
[agents.fromfile]
use = "echo"

[[connectors]]
path = "/ws"
secrets = ["{SECRET}"]
"""


async def test_create_app_with_a_dict(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(app=connic.create_app(make_config(agents={"fromdict": {"use": "echo"}})))
    client = await connect(server.url())
    assert client.connected["agents"] == ["fromdict"]  # type: ignore[attr-defined]
    await assert_echo(client)


@pytest.mark.parametrize("as_str", [False, True])
async def test_create_app_with_a_path(
    tmp_path: Path, start_server: StartServer, connect: Connect, as_str: bool
) -> None:
    path = tmp_path / "connic.toml"
    path.write_text(TOML, encoding="utf-8")
    server = await start_server(app=connic.create_app(str(path) if as_str else path))
    client = await connect(server.url())
    assert client.connected["agents"] == ["fromfile"]  # type: ignore[attr-defined]
    await assert_echo(client)


async def test_create_app_with_a_config_object(tmp_path: Path, start_server: StartServer, connect: Connect) -> None:
    config = connic.parse_config(make_config(agents={"fromobject": {"use": "echo"}}))
    assert isinstance(config, connic.Config)
    server = await start_server(app=connic.create_app(config))
    client = await connect(server.url())
    assert client.connected["agents"] == ["fromobject"]  # type: ignore[attr-defined]
    await assert_echo(client)

    path = tmp_path / "loaded.toml"
    path.write_text(TOML, encoding="utf-8")
    loaded = connic.load_config(path)
    assert loaded.source == str(path)
    server = await start_server(app=connic.create_app(loaded))
    client = await connect(server.url())
    assert client.connected["agents"] == ["fromfile"]  # type: ignore[attr-defined]


def test_create_app_with_a_bad_path_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(TOML + "\nmax_messages = 0\n", encoding="utf-8")
    with pytest.raises(connic.ConfigError, match=r"bad\.toml.*max_messages"):
        connic.create_app(path)
    with pytest.raises(connic.ConfigError, match="no such file"):
        connic.create_app(tmp_path / "missing.toml")
