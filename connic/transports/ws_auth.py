"""Authenticating a WebSocket connection: the secret in the handshake, or in the first frame.

This is part of :class:`~connic.transports.ws_connection.Connection`, kept in its own
module for size, as :mod:`.ws_resume` is. :func:`authenticate` runs once, before the
connection reads anything else: a secret the handshake carried (or ``require_auth``
off) opens a fresh session at once; otherwise the first frame must come within
``auth_timeout`` (the pings and pongs before it are answered, not counted) and be an
``auth`` or ``resume`` frame with an accepted secret. Until then frames are bounded
by ``max_auth_frame_bytes`` (:mod:`._aiohttp_auth`). The functions act for the
connection and use its internals as its own methods would.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import WSMsgType

from connic.errors import AuthTimeout, ProtocolError, Unauthorized
from connic.frames import AuthFrame, ClientFrame, ResumeFrame, parse_client_frame
from connic.transports._aiohttp_raw import Socket

if TYPE_CHECKING:
    from connic.transports.ws_connection import Connection

__all__ = ["authenticate"]


async def authenticate(conn: Connection, handshake_secret: str | None) -> bool:
    """Authenticate and attach to a session (new or resumed); False if the connection must end."""
    transport = conn.transport
    opts = transport.options
    if not opts.require_auth or handshake_secret is not None:
        if opts.require_auth and not transport.check_secret(handshake_secret):
            conn.close(Unauthorized("wrong secret"))
            return False
        # Authenticated already: a fresh session now; a resume may still come as the first frame.
        await conn._open_fresh(None)
        return True
    frame = await _first_frame(conn)
    if frame is None:
        return False
    if isinstance(frame, AuthFrame | ResumeFrame) and transport.check_secret(frame.secret):
        _lift_auth_bound(conn)
        if isinstance(frame, ResumeFrame):
            await conn._resume(frame)
        else:
            await conn._open_fresh(None)
        return True
    secret = frame.secret if isinstance(frame, AuthFrame | ResumeFrame) else None
    if isinstance(frame, AuthFrame | ResumeFrame):
        conn.close(Unauthorized("wrong secret" if secret else "missing secret"))
    else:
        conn.close(Unauthorized('the first frame must authenticate: {"secret": "..."}'))
    return False


def _lift_auth_bound(conn: Connection) -> None:
    # Frames up to max_frame_bytes from now on (until now: max_auth_frame_bytes).
    if isinstance(conn.ws, Socket):
        conn.ws.authenticated()


async def _first_frame(conn: Connection) -> ClientFrame | None:
    """The client's first frame, within ``auth_timeout``; None when the connection must end."""
    timeout = conn.transport.options.auth_timeout
    try:
        # One deadline for the whole wait: pings and pongs come through receive(), and a
        # per-receive timeout would restart with each of them.
        async with asyncio.timeout(timeout):
            msg = await conn.ws.receive()
            conn.heartbeat.last_seen = conn._loop.time()
            while msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                conn._control(msg.type, msg.data)
                msg = await conn.ws.receive()
                conn.heartbeat.last_seen = conn._loop.time()
    except TimeoutError:
        conn.close(AuthTimeout(f"no authentication within {timeout:g} s"))
        return None
    if msg.type is WSMsgType.TEXT:
        try:
            return parse_client_frame(msg.data)
        except ProtocolError:
            pass
    if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
        conn.close(Unauthorized('the first frame must authenticate: {"secret": "..."}'))
    elif msg.type is WSMsgType.CLOSE:
        conn.client_close = msg.data  # the client left before authenticating: its code is counted
    return None
