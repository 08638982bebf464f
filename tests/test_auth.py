"""PROTOCOL.md section 1: connecting and authenticating."""

from __future__ import annotations

import uuid

import pytest
import websockets

from conftest import SECRET, Connect, StartServer, make_config


async def test_first_frame_secret_gets_connected_with_all_fields(server, connect: Connect) -> None:
    client = await connect(server.url())
    frame = client.connected
    assert uuid.UUID(frame["session_id"]).version == 4
    assert frame["connector_run_id"] == frame["session_id"]
    assert frame["agents"] == ["assistant"]
    assert frame["protocol"] == "connic/1"
    assert frame["streaming"] is True
    assert frame["max_messages"] == 100
    assert frame["session_timeout"] == 3600


async def test_each_connection_is_its_own_session(server, connect: Connect) -> None:
    a = await connect(server.url())
    b = await connect(server.url())
    assert a.connected["session_id"] != b.connected["session_id"]


async def test_auth_frame_with_type(server, connect: Connect) -> None:
    client = await connect(server.url(), secret=None, expect_connected=False)
    await client.send({"type": "auth", "secret": SECRET})
    assert (await client.recv())["type"] == "connected"


@pytest.mark.parametrize(
    ("suffix", "headers"),
    [
        ("", {"X-Connic-Secret": SECRET}),
        (f"?secret={SECRET}", None),
        (f"?X-Connic-Secret={SECRET}", None),
    ],
)
async def test_secret_at_handshake(server, connect: Connect, suffix: str, headers: dict[str, str] | None) -> None:
    client = await connect(server.url() + suffix, secret=None, additional_headers=headers)
    assert client.connected["type"] == "connected"
    # The seed's auth frame sent anyway is ignored: no error, no second connected.
    await client.send({"secret": SECRET})
    frames = await client.reply({"message": "hi"})
    assert [f["type"] for f in frames] == ["ack", "stream_start", "stream_chunk", "stream_end"]


async def test_several_secrets(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"secrets": ["old", "new"]}))
    await connect(server.url(), secret="old")
    await connect(server.url(), secret="new")
    client = await connect(server.url(), secret="other", expect_connected=False)
    code, _ = await client.closed()
    assert code == 4001


async def test_connic_secret_env_adds_one(
    start_server: StartServer, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONNIC_SECRET", "from-env")
    server = await start_server()
    await connect(server.url(), secret="from-env")
    await connect(server.url(), secret=SECRET)


@pytest.mark.parametrize(
    "first",
    [
        {"secret": "wrong"},
        {"secret": 123},
        {"type": "auth"},
        {"message": "hello before auth"},
        {"type": "ping"},
        "not json",
        b"\x00binary",
    ],
)
async def test_failed_auth_closes_4001(server, connect: Connect, first: object) -> None:
    client = await connect(server.url(), secret=None, expect_connected=False)
    await client.send(first)
    code, frames = await client.closed()
    assert frames and frames[0]["type"] == "error" and frames[0]["code"] == "unauthorized"
    assert frames[0]["id"] is None
    assert code == 4001


async def test_wrong_handshake_secret_closes_4001(server, connect: Connect) -> None:
    client = await connect(server.url() + "?secret=nope", secret=None, expect_connected=False)
    code, frames = await client.closed()
    assert [f["code"] for f in frames] == ["unauthorized"]
    assert code == 4001


async def test_auth_timeout_closes_4002(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"auth_timeout": 0.3}))
    client = await connect(server.url(), secret=None, expect_connected=False)
    code, frames = await client.closed()
    assert [f["code"] for f in frames] == ["auth_timeout"]
    assert code == 4002


async def test_no_auth_connects_at_once_and_ignores_secret_frames(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"require_auth": False, "secrets": []}))
    client = await connect(server.url(), secret=None)
    await client.send({"secret": "anything"})
    frames = await client.reply({"message": "still fine"})
    assert frames[0] == {"type": "ack", "id": frames[0]["id"], "message_number": 1}
    assert frames[-1]["full_response"] == "still fine"


async def test_origin_allow_list(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"allowed_origins": ["https://app.example.com", "https://*.trusted.dev"]}))
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(server.url(), origin="https://evil.example.com")
    assert refused.value.response.status_code == 403
    await connect(server.url(), origin="https://app.example.com")
    await connect(server.url(), origin="https://chat.trusted.dev")
    await connect(server.url())  # no Origin: not a browser


async def test_require_auth_without_secret_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import connic

    monkeypatch.delenv("CONNIC_SECRET", raising=False)
    with pytest.raises(connic.ConfigError, match=r"connectors\[0\]\.secrets: require_auth is on"):
        connic.create_app(make_config({"secrets": []}))
