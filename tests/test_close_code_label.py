"""``connic_closes_total``'s ``code`` label is bounded: a client's own close codes share one series.

A client chooses the code it closes with, and 3000-4999 are all valid: counted each under its
own number, one client closing 2,000 times made 2,000 series per connector, kept for good.
The standard codes (1000-1015) and connic's own (4001, 4010...) keep their number; any other
is counted as ``other``. Real ``websockets`` clients, a real server, GET /metrics.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets
from test_agui_support import AUTH, agui_config, agui_registry
from test_metrics import samples, scrape

from conftest import Connect, StartServer
from connic.errors import ConnicError, Unauthorized
from connic.metrics import OTHER_CLOSE_CODE, close_code_label

CHOSEN = [4100 + n for n in range(50)]  # 50 private-use codes a client made up
KEPT = [1000, 1001, 1008, 4001]  # standard ones, and one of connic's own (unauthorized) sent by a client


async def closes(http: str, connector: str, total: int) -> dict[str, float]:
    """``{code label: count}`` of ``connector``'s closes, once ``total`` are counted (bounded wait).

    The server counts a close as the connection's handler ends, after the client has seen it.
    """
    deadline = time.monotonic() + 20
    while True:
        prefix = "connic_closes_total{code="
        suffix = f',connector="{connector}"}}'
        _, text = await scrape(http)
        found = {
            name[len(prefix) + 1 : -len(suffix) - 1]: value
            for name, value in samples(text).items()
            if name.startswith(prefix) and name.endswith(suffix)
        }
        if sum(found.values()) >= total or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_fifty_client_chosen_codes_make_a_bounded_number_of_series_on_the_websocket_connector(
    start_server: StartServer, connect: Connect
) -> None:
    # The client's own code is counted (1000 ended the session, 1001 detached it), each made-up
    # code under "other".
    server = await start_server()
    for code in [*CHOSEN, 3000, 4999, *KEPT]:
        client = await connect(server.url())
        await client.ws.close(code=code)
    unauthenticated = await websockets.connect(server.url(), open_timeout=5)  # before its auth frame
    await unauthenticated.close(code=4322)
    total = len(CHOSEN) + 2 + len(KEPT) + 1
    found = await closes(server.http, "/ws", total)
    assert sum(found.values()) == total
    assert found == {OTHER_CLOSE_CODE: len(CHOSEN) + 3, **{str(code): 1.0 for code in KEPT}}, found


async def test_codes_connic_sends_keep_their_number(start_server: StartServer, connect: Connect) -> None:
    server = await start_server()
    client = await connect(server.url(), secret="wrong", expect_connected=False)
    code, _ = await client.closed()
    assert code == 4001  # connic closed it: unauthorized
    assert await closes(server.http, "/ws", 1) == {"4001": 1.0}


async def test_fifty_client_chosen_codes_are_one_series_on_the_agui_websocket(start_server: StartServer) -> None:
    # AG-UI's WebSocket binding counts the client's own code: each was a series of its own.
    server = await start_server(agui_config(), registry=agui_registry())
    for code in [*CHOSEN, 1000]:
        ws = await websockets.connect(server.base + "/agui/ws", additional_headers=AUTH, open_timeout=5)
        await ws.close(code=code)
    found = await closes(server.http, "/agui", len(CHOSEN) + 1)
    assert found == {OTHER_CLOSE_CODE: len(CHOSEN), "1000": 1.0}


class PluginError(ConnicError):
    """A plugin's own error, closing with a code of its own."""

    code = "plugin_error"
    close_code = 4321


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (1000, "1000"),
        (1006, "1006"),  # not sent by anyone: it stands for a connection that dropped
        (1012, "1012"),
        (1015, "1015"),
        (Unauthorized.close_code, "4001"),
        (4010, "4010"),
        (PluginError.close_code, "4321"),  # a ConnicError subclass's code is connic's too
        (4322, OTHER_CLOSE_CODE),
        (3000, OTHER_CLOSE_CODE),
        (1016, OTHER_CLOSE_CODE),
        (None, "None"),  # as before: no code at all is its own (rare) series
    ],
)
def test_the_label_of_a_close_code(code: int | None, label: str) -> None:
    assert close_code_label(code) == label
