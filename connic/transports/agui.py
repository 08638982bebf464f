"""The ``agui`` transport: connic's agents over AG-UI (HTTP + SSE), on the session core.

``POST {path}`` (or ``{path}/{agent}``) with a ``RunAgentInput`` answers with an
SSE stream of AG-UI events. The run's ``threadId`` is a connic session id: a
new thread opens a session under that id, a known one continues it (its history
in the store), whichever connector opened it. Auth, limits, history, agent
state, metrics and draining are the session core's (docs/agui.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
from aiohttp import web

from connic.agent import Agent
from connic.app import RUNTIME
from connic.config import ConnectorConfig, at_least_one, in_range, non_negative, positive
from connic.errors import (
    ConfigError,
    MessageTooLarge,
    ServerRestarting,
    ServerShuttingDown,
    SessionTakenOver,
    StoreUnavailable,
)
from connic.flow import Flag
from connic.frames import MessageFrame
from connic.metrics import close_code_label
from connic.middleware import MiddlewareFunc
from connic.transport import Transport
from connic.transports._aiohttp_raw import Socket, drop_after
from connic.transports.agui_threads import TOKEN_HEADER, Threads, forwarded_token
from connic.transports.session_transport import SessionTransport, SessionTransportOptions

if TYPE_CHECKING:
    from ag_ui.core import RunAgentInput

    from connic.transports.agui_sse import SSERun
    from connic.transports.agui_ws import WSBinding

__all__ = ["AguiTransport"]

log = logging.getLogger("connic.agui")

SECRET_HEADER = "X-Connic-Secret"


class BindingSocket(Socket):
    """The WebSocket binding's socket: connic's, whose frames over ``max_body_bytes`` (inflated or
    not) are refused with a ``RUN_ERROR`` ``message_too_large``, then close 1009."""

    __slots__ = ()

    def too_large(self, limit: str) -> str:
        """A ``RUN_ERROR`` naming ``max_body_bytes``, the binding's bound (``limit`` is the connic WebSocket's)."""
        from ag_ui.core import RunErrorEvent

        message = "the frame is larger than max_body_bytes"
        return RunErrorEvent(message=message, code=MessageTooLarge.code).model_dump_json(by_alias=True)


class AguiTransport(SessionTransport):
    """AG-UI's HTTP binding: a ``RunAgentInput`` in, the run's events out as SSE."""

    @attrs.frozen
    class Options(SessionTransportOptions):
        """An agui connector's keys (see docs/configuration.md): the shared ones and its own."""

        progress_events: bool = True
        resume_window: float = attrs.field(default=3600.0, validator=[non_negative, in_range(0, 86400)])
        on_disconnect: Literal["continue", "cancel"] = "cancel"
        max_body_bytes: int = attrs.field(default=1024 * 1024, validator=at_least_one)
        body_timeout: float = attrs.field(default=30.0, validator=[positive, in_range(0, 86400)])

    options: Options

    def __init__(
        self,
        *,
        connector: ConnectorConfig,
        options: Any,
        agents: Mapping[str, Agent],
        middleware: Sequence[MiddlewareFunc],
        where: str,
        key: str,
    ) -> None:
        super().__init__(
            connector=connector, options=options, agents=agents, middleware=middleware, where=where, key=key
        )
        try:
            from ag_ui.encoder import EventEncoder
        except ImportError:
            raise ConfigError(
                f"{where}: {key}.transport: the agui transport needs the ag-ui-protocol package: "
                "pip install 'connic[agui]'"
            ) from None
        self.encoder = EventEncoder()
        self.runs: set[SSERun] = set()
        self.bindings: set[WSBinding] = set()  # open WebSocket binding connections
        self.no_runs = Flag(True)  # set while no run streams and no binding is open (shutdown waits for it)
        self.threads = Threads(self)
        self.draining = False
        self.runtime_transports: list[Transport] = []

    def install(self, app: web.Application) -> None:
        """Serve ``POST {path}`` and ``POST {path}/{agent}`` (and their CORS preflights), and ``GET {path}/ws``."""
        runtime = app.get(RUNTIME)
        if runtime is not None:
            self.runtime_transports = list(runtime.transports)  # whose sessions a thread may continue
        path = self.connector.path.rstrip("/") or ""
        for route in (path or "/", f"{path}/{{agent}}"):
            app.router.add_post(route, self.handle)
            app.router.add_route("OPTIONS", route, self.preflight)
        app.router.add_get(f"{path}/ws", self.handle_ws)
        app.router.add_get(f"{path}/ws/{{agent}}", self.handle_ws)
        if path and (runtime is None or runtime.config.server.playground):
            app.router.add_get(path, self.page)  # a small chat page that speaks AG-UI (docs/agui.md)
            app.router.add_get(f"{path}/page.js", self.page_script)

    async def page(self, request: web.Request) -> web.Response:
        """The connector's browser page."""
        from connic.transports.agui_page import HEADERS, page

        text = page(request.path, self.agent_names)
        return web.Response(text=text, content_type="text/html", charset="utf-8", headers=HEADERS)

    async def page_script(self, request: web.Request) -> web.Response:
        """The page's script."""
        from connic.transports.agui_page import HEADERS, SCRIPT

        return web.Response(text=SCRIPT, content_type="text/javascript", charset="utf-8", headers=HEADERS)

    def describe(self, base_url: str) -> str:
        """The URL to POST runs to."""
        return base_url.replace("ws://", "http://", 1) + self.connector.path + " (AG-UI)"

    # --- who may run --------------------------------------------------------------

    @staticmethod
    def request_secret(request: web.Request) -> str | None:
        """``Authorization: Bearer <secret>``, else ``X-Connic-Secret``."""
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return request.headers.get(SECRET_HEADER)

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None or not self.origin_allowed(origin, request.headers.get("Host")):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    async def preflight(self, request: web.Request) -> web.Response:
        """A browser asks whether it may POST a run from its page's origin."""
        headers = self._cors(request)
        if not headers:
            raise web.HTTPForbidden(text="origin not allowed\n")
        headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        allowed = ("Content-Type", "Accept", "Authorization", SECRET_HEADER, TOKEN_HEADER)
        headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
        headers["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=headers)

    def refuse(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
        """A refusal before any stream: HTTP ``status`` with ``text`` as its one line, counted in the metrics."""
        self.metrics.refused.inc(self.connector.path, str(status))
        return web.Response(status=status, text=text + "\n", headers=headers)

    # --- a run --------------------------------------------------------------------

    def check_request(self, request: web.Request, *, query_secret: bool = False) -> web.Response | None:
        """What every request goes through before its body is read: origin, draining, the brake, the secret, the agent.

        None when it may go on; else the refusal (403, 503, 429, 401, 404), with no stream begun.
        """
        cors = self._cors(request)
        if request.headers.get("Origin") is not None and not cors:
            return self.refuse(403, "origin not allowed")
        if self.draining:
            return self.refuse(503, "server is shutting down")
        peer = request.remote or "unknown"
        wait = self.throttle.retry_after(peer)
        if wait is not None:
            retry = str(max(1, math.ceil(wait)))
            return self.refuse(429, "too many failed authentications from your address", {"Retry-After": retry})
        secret = self.request_secret(request)
        if secret is None and query_secret:
            secret = request.query.get("secret")  # a browser's WebSocket cannot send headers
        if self.options.require_auth and not self.secret_matches(secret):
            self.throttle.failed(peer)
            headers = {"WWW-Authenticate": 'Bearer realm="connic"', **cors}
            return self.refuse(401, "missing or wrong secret", headers)
        agent = request.match_info.get("agent")
        if agent is not None and agent not in self.agents:
            return self.refuse(404, f"no agent {agent!r} on this connector (agents: {', '.join(self.agent_names)})")
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST`` a ``RunAgentInput``: 401/403/413/422/429/503 before any stream, else the run's events."""
        from connic.transports.agui_input import read_run

        refused = self.check_request(request)
        if refused is not None:
            return refused
        cors = self._cors(request)
        # Counted from before the body is read: a client that sends bodies slowly, or declares
        # more than it sends, holds a connection (and up to max_body_bytes) meanwhile.
        slot = self.gate.enter(request.remote or "unknown", authenticated=True)
        if isinstance(slot, int):
            return self.refuse(slot, "too many connections", {"Retry-After": "5", **cors})
        try:
            opts = self.options
            problem, run, frame = await read_run(
                request, opts.max_body_bytes, opts.body_timeout, request.match_info.get("agent")
            )
            if problem is not None:
                refusal = self.refuse(problem[0], problem[1], cors)
                if problem[0] == 408:
                    await drop_after(request, refusal)
                return refusal
            assert run is not None and frame is not None
            if not await self.store.available():
                return self.refuse(503, "the session store cannot be reached", {"Retry-After": "5", **cors})
            return await self._run(request, run, frame, cors)
        finally:
            self.gate.leave(slot)

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """``GET {path}/ws`` (or ``{path}/ws/{agent}``): AG-UI's WebSocket binding, several runs per connection."""
        from connic.transports.agui_ws import WSBinding

        refused = self.check_request(request, query_secret=True)
        if refused is not None:
            return refused
        path = self.connector.path
        ws = BindingSocket(
            max_msg_size=self.options.max_body_bytes + 1,  # aiohttp refuses sizes >= max_msg_size
            autoping=True,
            counted=lambda code: self.metrics.errors.inc(path, code),
        )
        if not ws.can_prepare(request).ok:
            return self.refuse(400, f"this is a WebSocket endpoint: connect with ws://...{request.path}")
        if not await self.store.available():
            return self.refuse(503, "the session store cannot be reached", {"Retry-After": "5"})
        slot = self.gate.enter(request.remote or "unknown", authenticated=True)
        if isinstance(slot, int):
            return self.refuse(slot, "too many connections", {"Retry-After": "5"})
        try:
            await ws.prepare(request)
            binding = WSBinding(self, ws, request, request.match_info.get("agent"))
            self.bindings.add(binding)
            self.no_runs.clear()
            try:
                await binding.run()
            finally:
                self.bindings.discard(binding)
                if not self.runs and not self.bindings:
                    self.no_runs.set()
        finally:
            self.gate.leave(slot)
        return ws

    async def _run(
        self, request: web.Request, run: RunAgentInput, frame: MessageFrame, cors: Mapping[str, str]
    ) -> web.StreamResponse:
        from connic.transports.agui_events import RunEvents
        from connic.transports.agui_sse import SSERun

        try:
            given = request.headers.get(TOKEN_HEADER) or forwarded_token(run)
            joined = await self.threads.join(run, given, request.remote or "unknown")
        except StoreUnavailable as exc:
            log.warning("thread %s: the session store failed: %s", run.thread_id, exc.why)
            return self.refuse(503, exc.message, {"Retry-After": "5", **cors})
        if isinstance(joined, web.Response):
            return joined
        session, runs = joined
        if run.run_id in runs.runs:  # the run's id is its connic message's
            return self.refuse(409, f"run {run.run_id!r} is already under way on this thread", cors)
        agents = (frame.agent,) if frame.agent is not None else session.sessions.agent_names
        events = RunEvents(run.thread_id, run.run_id, agents)
        opts = self.options
        path = self.connector.path
        sink = SSERun(
            events,
            self.encoder,
            request,
            limit=opts.send_queue,
            send_timeout=opts.send_timeout,
            metrics=self.metrics,
            label=path,
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": self.encoder.get_content_type(),
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy must pass each event on as it comes
                **cors,
            }
        )
        self.metrics.connections.inc(path)
        self.metrics.connections_open.inc(path)
        started = asyncio.get_running_loop().time()
        log.info("open session=%s peer=%s connector=%s run=%s", session.id, request.remote, path, run.run_id)
        runs.runs[run.run_id] = sink
        self.runs.add(sink)
        self.no_runs.clear()
        try:
            await response.prepare(request)
            sink.start(events.started())
            if session.sink is runs:
                await session.admit(frame)
            else:
                sink.fail(SessionTakenOver("another connection took this thread over; run again"))
            await sink.stream(response)
        finally:
            self.runs.discard(sink)
            if not self.runs and not self.bindings:
                self.no_runs.set()
            if sink.close_code is None:
                sink.close_code = 1006
            self.threads.leave(session, runs, run.run_id, sink)
            self.metrics.connections_open.dec(path)
            self.metrics.closes.inc(path, close_code_label(sink.close_code))
            log.info(
                "close session=%s peer=%s connector=%s code=%s authenticated=True duration=%.3fs",
                session.id,
                request.remote,
                path,
                sink.close_code,
                asyncio.get_running_loop().time() - started,
            )
        if sink.close_code == 1000:
            await response.write_eof()
        return response

    async def shutdown(self, grace: float) -> None:
        """Drain the sessions (in-flight replies get ``grace`` seconds), then end the runs still open."""
        self.draining = True
        await self.sessions.shutdown(grace)
        error = (
            ServerRestarting("the server is restarting")
            if self.restarting
            else ServerShuttingDown("the server is shutting down")
        )
        for sink in list(self.runs):
            sink.fail(error)
        for binding in list(self.bindings):
            binding.end(error, True)  # its open runs end with RUN_ERROR, then it closes 1001 (1012)
        try:
            async with asyncio.timeout(self.options.send_timeout):
                await self.no_runs.wait()
        except TimeoutError:
            for sink in list(self.runs):
                sink.slow_consumer()
            for binding in list(self.bindings):
                binding.slow_consumer()
