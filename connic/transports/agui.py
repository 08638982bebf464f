"""The ``agui`` transport: connic's agents over AG-UI (HTTP + SSE), on the session core.

``POST {path}`` (or ``{path}/{agent}``) with a ``RunAgentInput`` answers with an
SSE stream of AG-UI events. The run's ``threadId`` is a connic session id: a
new thread opens a session under that id, a known one continues it (its history
in the store), whichever connector opened it. Auth, limits, history, agent
state, metrics and draining are the session core's (docs/agui.md).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
from aiohttp import web

from connic.agent import Agent
from connic.app import RUNTIME
from connic.config import ConnectorConfig, in_range, non_negative, positive
from connic.errors import ConfigError, ServerRestarting, ServerShuttingDown, SessionTakenOver, StoreUnavailable
from connic.flow import Flag
from connic.frames import MessageFrame
from connic.middleware import MiddlewareFunc
from connic.pipeline import TurnChain, build_turn_chain
from connic.session import ChatSession, SessionState
from connic.sessions import Sessions
from connic.throttle import AuthThrottle
from connic.transport import Transport
from connic.transports.websocket import RateLimit, _local_origin

if TYPE_CHECKING:
    from ag_ui.core import RunAgentInput

    from connic.transports.agui_sse import SSERun
    from connic.transports.agui_ws import WSBinding

__all__ = ["AguiTransport"]

log = logging.getLogger("connic.agui")

SECRET_HEADER = "X-Connic-Secret"
TOKEN_HEADER = "X-Connic-Resume-Token"


def _at_least_one(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value!r}")


class AguiTransport(Transport):
    """AG-UI's HTTP binding: a ``RunAgentInput`` in, the run's events out as SSE."""

    @attrs.frozen
    class Options:
        """An agui connector's own keys (see docs/configuration.md); the same names mean the same as on websocket."""

        streaming: bool = True
        progress_events: bool = True
        require_auth: bool = True
        secrets: tuple[str, ...] = ()
        session_timeout: float = attrs.field(default=3600.0, validator=[positive, in_range(0, 86400)])
        max_messages: int = attrs.field(default=100, validator=in_range(1, 10_000))
        allowed_origins: tuple[str, ...] = ()
        max_body_bytes: int = attrs.field(default=1024 * 1024, validator=_at_least_one)
        max_queued: int = attrs.field(default=10, validator=_at_least_one)
        agent_timeout: float = attrs.field(default=300.0, validator=positive)
        send_queue: int = attrs.field(default=256, validator=_at_least_one)
        send_timeout: float = attrs.field(default=30.0, validator=positive)
        rate_limit: RateLimit | None = None
        resume_window: float = attrs.field(default=3600.0, validator=[non_negative, in_range(0, 86400)])
        replay_buffer: int = attrs.field(default=4096, validator=in_range(1, 1_000_000))
        on_disconnect: Literal["continue", "cancel"] = "cancel"
        producer_timeout: float = attrs.field(default=10.0, validator=positive)
        max_history_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_at_least_one)
        max_auth_failures: int = attrs.field(default=10, validator=non_negative)
        auth_failure_window: float = attrs.field(default=60.0, validator=positive)

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
        env_secret = os.environ.get("CONNIC_SECRET")
        secrets = [*self.options.secrets, *([env_secret] if env_secret else [])]
        if any(not s for s in secrets):
            raise ConfigError(f"{where}: {key}.secrets: a secret must not be empty")
        if self.options.require_auth and not secrets:
            raise ConfigError(
                f"{where}: {key}.secrets: require_auth is on but no secret is configured "
                "(set secrets, the CONNIC_SECRET environment variable, or require_auth = false)"
            )
        self._secrets = [s.encode() for s in secrets]
        self.agent_names = tuple(agents)
        self.chains: dict[str, TurnChain] = {
            name: build_turn_chain(
                agent,
                streaming_on=self.options.streaming,
                agent_timeout=self.options.agent_timeout,
                user_middleware=self.middleware,
                progress_events=self.options.progress_events,
            )
            for name, agent in agents.items()
        }
        self.throttle = AuthThrottle(
            self.options.max_auth_failures if self.options.require_auth else 0,
            self.options.auth_failure_window,
            name=connector.path,
        )
        self.runs: set[SSERun] = set()
        self.bindings: set[WSBinding] = set()  # open WebSocket binding connections
        self.no_runs = Flag(True)  # set while no run streams (shutdown waits for it)
        self.draining = False
        self._sessions: Sessions | None = None
        self._runtime_transports: list[Transport] = []

    @property
    def sessions(self) -> Sessions:
        """This connector's sessions (made once the runtime has given the transport its store and metrics)."""
        if self._sessions is None:
            self._sessions = Sessions(
                label=self.connector.path,
                chains=self.chains,
                options=self.options,
                metrics=self.metrics,
                store=self.store,
            )
        return self._sessions

    def install(self, app: web.Application) -> None:
        """Serve ``POST {path}`` and ``POST {path}/{agent}`` (and their CORS preflights), and ``GET {path}/ws``."""
        runtime = app.get(RUNTIME)
        if runtime is not None:
            self._runtime_transports = list(runtime.transports)  # whose sessions a thread may continue
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

    def check_secret(self, secret: str | None) -> bool:
        """Constant-time comparison against every configured secret."""
        if secret is None:
            return False
        given = secret.encode("utf-8", "surrogatepass")
        ok = False
        for candidate in self._secrets:
            ok |= hmac.compare_digest(given, candidate)
        return ok

    @staticmethod
    def request_secret(request: web.Request) -> str | None:
        """``Authorization: Bearer <secret>``, else ``X-Connic-Secret``."""
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return request.headers.get(SECRET_HEADER)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """The websocket connector's rule (docs/security.md): listed origins, else any with auth on, else local."""
        if origin is None:
            return True
        patterns = self.options.allowed_origins
        if patterns:
            import fnmatch

            return any(fnmatch.fnmatchcase(origin.lower(), p.lower()) for p in patterns)
        return self.options.require_auth or _local_origin(origin, host)

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

    def _refuse(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
        self.metrics.refused.inc(self.connector.path, str(status))
        return web.Response(status=status, text=text + "\n", headers=headers)

    # --- a run --------------------------------------------------------------------

    def check_request(self, request: web.Request, *, query_secret: bool = False) -> web.Response | None:
        """What every request goes through before its body is read: origin, draining, the brake, the secret, the agent.

        None when it may go on; else the refusal (403, 503, 429, 401, 404), with no stream begun.
        """
        cors = self._cors(request)
        if request.headers.get("Origin") is not None and not cors:
            return self._refuse(403, "origin not allowed")
        if self.draining:
            return self._refuse(503, "server is shutting down")
        peer = request.remote or "unknown"
        wait = self.throttle.retry_after(peer)
        if wait is not None:
            retry = str(max(1, math.ceil(wait)))
            return self._refuse(429, "too many failed authentications from your address", {"Retry-After": retry})
        secret = self.request_secret(request)
        if secret is None and query_secret:
            secret = request.query.get("secret")  # a browser's WebSocket cannot send headers
        if self.options.require_auth and not self.check_secret(secret):
            self.throttle.failed(peer)
            headers = {"WWW-Authenticate": 'Bearer realm="connic"', **cors}
            return self._refuse(401, "missing or wrong secret", headers)
        agent = request.match_info.get("agent")
        if agent is not None and agent not in self.agents:
            return self._refuse(404, f"no agent {agent!r} on this connector (agents: {', '.join(self.agent_names)})")
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST`` a ``RunAgentInput``: 401/403/413/422/429/503 before any stream, else the run's events."""
        from connic.transports.agui_input import read_run

        refused = self.check_request(request)
        if refused is not None:
            return refused
        cors = self._cors(request)
        problem, run, frame = await read_run(request, self.options.max_body_bytes, request.match_info.get("agent"))
        if problem is not None:
            return self._refuse(problem[0], problem[1], cors)
        assert run is not None and frame is not None
        if not await self.store.available():
            return self._refuse(503, "the session store cannot be reached", {"Retry-After": "5", **cors})
        slot = self.gate.enter(request.remote or "unknown", authenticated=True)
        if isinstance(slot, int):
            return self._refuse(slot, "too many connections", {"Retry-After": "5", **cors})
        try:
            return await self._run(request, run, frame, cors)
        finally:
            self.gate.leave(slot)

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """``GET {path}/ws`` (or ``{path}/ws/{agent}``): AG-UI's WebSocket binding, several runs per connection."""
        from connic.transports.agui_ws import WSBinding

        refused = self.check_request(request, query_secret=True)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse(max_msg_size=self.options.max_body_bytes + 1, autoping=True)
        if not ws.can_prepare(request).ok:
            return self._refuse(400, f"this is a WebSocket endpoint: connect with ws://...{request.path}")
        if not await self.store.available():
            return self._refuse(503, "the session store cannot be reached", {"Retry-After": "5"})
        slot = self.gate.enter(request.remote or "unknown", authenticated=True)
        if isinstance(slot, int):
            return self._refuse(slot, "too many connections", {"Retry-After": "5"})
        try:
            await ws.prepare(request)
            binding = WSBinding(self, ws, request, request.match_info.get("agent"))
            self.bindings.add(binding)
            try:
                await binding.run()
            finally:
                self.bindings.discard(binding)
        finally:
            self.gate.leave(slot)
        return ws

    async def _run(
        self, request: web.Request, run: RunAgentInput, frame: MessageFrame, cors: Mapping[str, str]
    ) -> web.StreamResponse:
        from connic.transports.agui_events import RunEvents, seed_of
        from connic.transports.agui_sse import SSERun

        try:
            found = await self.thread(run.thread_id, request.headers.get(TOKEN_HEADER) or _forwarded_token(run))
        except StoreUnavailable as exc:
            return self._refuse(503, exc.message, {"Retry-After": "5", **cors})
        if isinstance(found, web.Response):
            return found
        session, fresh = found
        if fresh:
            for entry in seed_of(run, session.sessions.agent_names):
                session.history.add(entry)
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
        self.runs.add(sink)
        self.no_runs.clear()
        attached = False
        try:
            await response.prepare(request)
            sink.start(events.started())
            if fresh:
                session.attach(sink)
                attached = True
            else:
                last = session.seq
                replay = await session.replay(sink, last)  # takes over a connection attached to it
                if replay is None or session.state is SessionState.ENDED:
                    sink.fail(SessionTakenOver("another run took this thread over meanwhile; run again"))
                else:
                    session.resume(sink, last + len(replay[1]))
                    attached = True
            if session.sink is sink:
                session.admit(frame)
            await sink.stream(response)
        finally:
            self.runs.discard(sink)
            if not self.runs:
                self.no_runs.set()
            if sink.close_code is None:
                sink.close_code = 1006
            if fresh and not attached:
                session.end()  # opened for this run, which never began (the client went away first)
            # Done, or the client went away: the session stays for the thread's next run
            # (on_disconnect says whether an unfinished reply goes on meanwhile).
            session.detach(sink)
            self.metrics.connections_open.dec(path)
            self.metrics.closes.inc(path, str(sink.close_code))
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

    async def thread(self, thread_id: str, given: str | None) -> tuple[ChatSession, bool] | web.Response:
        """The session ``thread_id`` names, and whether it is new; or the response refusing it.

        ``given`` is the resume token the client sent, which a session another connector
        opened needs.
        """
        from connic.sessions import _token_matches

        store = self.store
        live = await store.get(thread_id)
        owner: Sessions | None = None
        token: str | None = None
        if live is not None:
            owner, token = live.sessions, live.token
        else:
            record = await store.load(thread_id)
            if record is not None:
                owner, token = self._peer(record.label), record.token
                if owner is None:
                    why = f"thread {thread_id!r} is a session of connector {record.label!r}, not served here"
                    return self._refuse(409, why)
        if owner is None:
            return await self.sessions.open(thread_id), True
        # A session another connector opened: its resume token proves the client's claim to it
        # (PROTOCOL.md §7), as a resume over that connector would.
        if owner is not self.sessions and (given is None or not _token_matches(token, given)):
            return self._refuse(
                403,
                f"thread {thread_id!r} is a session of connector {owner.label!r}: "
                f"send its resume_token in the {TOKEN_HEADER} header",
            )
        session = await owner.find(thread_id, token or "", 0) if token is not None else None
        if session is None:
            return self._refuse(409, f"thread {thread_id!r} cannot be continued now (ended, or served elsewhere)")
        return session, False

    def _peer(self, label: str) -> Sessions | None:
        if label == self.connector.path:
            return self.sessions
        for transport in self._runtime_transports:
            sessions = getattr(transport, "sessions", None)
            if isinstance(sessions, Sessions) and sessions.label == label:
                return sessions
        return None

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
        try:
            async with asyncio.timeout(self.options.send_timeout):
                await self.no_runs.wait()
        except TimeoutError:
            for sink in list(self.runs):
                sink.slow_consumer()


def _forwarded_token(run: RunAgentInput) -> str | None:
    props = run.forwarded_props
    if isinstance(props, dict):
        connic = props.get("connic")
        if isinstance(connic, dict) and isinstance(connic.get("resume_token"), str):
            token: str = connic["resume_token"]
            return token
    return None
