"""The ``redis`` store's connection to Redis: its two clients, bounded calls, and whether Redis is up.

Every call to Redis goes through :meth:`Connection._call`: it is bounded by the store's
``timeout`` and turns any failure into :class:`~connic.errors.StoreUnavailable`, so a
failing Redis never raises anything else into the session core. A failed call (other
than an error reply) marks Redis down; :meth:`Connection.available` then probes it with
a script, as sessions write, before each handshake until it answers again.

A Redis at its ``maxmemory`` with ``maxmemory-policy noeviction`` answers reads and refuses
writes (``OOM``): the store is then *full* (:mod:`~connic.stores.redis.full`) until a write
goes through again, and handshakes are refused (503) meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from connic.errors import StoreUnavailable
from connic.redact import safe_url
from connic.stores.redis import limit_scripts, scripts
from connic.stores.redis.checks import check_url, too_old, url_problem
from connic.stores.redis.full import Full, refused_full
from connic.stores.redis.keys import session_keys

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["SCRIPTS", "Connection", "ms", "ttl", "ttl_seconds"]

SCRIPTS = {
    name: getattr(module, name) for module in (scripts, limit_scripts) for name in module.__all__ if name.isupper()
}
"""The Lua scripts (:mod:`~connic.stores.redis.scripts`, :mod:`~connic.stores.redis.limit_scripts`) registered
when the store starts, by name."""


class Connection(Full):
    """The clients and the bounded call every part of :class:`~connic.stores.redis.RedisStore` shares."""

    options: Any

    def __init__(self) -> None:
        super().__init__()
        self._redis: Any = None
        self._blocking: Any = None  # XREAD BLOCK, pub/sub: no socket timeout (redis-py's would cut a block short)
        self._scripts: dict[str, Any] = {}
        self._down = False  # the last call to Redis got no answer (available() then probes)
        self._checking: asyncio.Task[bool] | None = None  # the one probe under way while down
        self._calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []  # for the next shared pipeline
        self._sending: set[asyncio.Task[None]] = set()  # the shared pipelines under way

    async def connect(self) -> None:
        """Make both clients and check that Redis answers; StoreUnavailable naming ``[store] url`` if not."""
        try:
            import redis.asyncio as aioredis  # here: the core never needs redis-py
        except ImportError:
            raise StoreUnavailable("[store] use = \"redis\" needs redis-py: pip install 'connic[redis]'") from None
        opts = self.options

        def client(socket_timeout: float | None) -> Any:
            # A pool that waits (within ``timeout``) for a free connection: redis-py's default one
            # refuses a call beyond its 100 connections, and a burst of handshakes needs more at once.
            pool = aioredis.BlockingConnectionPool.from_url(
                opts.url,
                max_connections=opts.max_connections,
                timeout=opts.timeout,
                decode_responses=True,
                encoding_errors="surrogatepass",  # JSON from a client may hold lone surrogates
                socket_timeout=socket_timeout,
                socket_connect_timeout=opts.timeout,
                # RESP2, redis-py's default before 8.0. With 8.x's RESP3 default its pool skips the
                # check that a pooled connection is still open (redis-py issue 4128), so after Redis
                # restarts the first call on each pooled connection failed, and a session with it.
                # A URL's ?protocol=3 still wins (redis-py lets the query override these arguments).
                protocol=2,
            )
            redis = aioredis.Redis(connection_pool=pool)
            redis.auto_close_connection_pool = True  # aclose() closes the pool too
            return redis

        try:
            check_url(opts.url)
            self._redis = client(opts.timeout)
            # redis-py passes the URL's query on to every connection it makes: an unknown
            # parameter would be a TypeError (a traceback) at the first call, so make one now.
            pool = self._redis.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as exc:
            await self.disconnect()
            raise StoreUnavailable(f"[store] url {safe_url(opts.url)!r}: {url_problem(exc)}") from None
        self._blocking = client(None)
        try:
            await self._call(self._redis.ping())
        except StoreUnavailable as exc:
            await self.disconnect()
            raise StoreUnavailable(f"[store] url {safe_url(opts.url)!r}: cannot reach Redis ({exc.why})") from None
        try:
            version = (await self._call(self._redis.info("server"))).get("redis_version", "")
        except StoreUnavailable:
            version = ""  # INFO refused (a managed Redis may rename it): the scripts will tell
        if too_old(version):
            await self.disconnect()
            raise StoreUnavailable(
                f"[store] url {safe_url(opts.url)!r}: Redis {version} is too old (connic needs 6.2 or later, or Valkey)"
            )
        self._scripts = {name: self._redis.register_script(script) for name, script in SCRIPTS.items()}

        def load(pipe: Any) -> None:
            for script in self._scripts.values():
                pipe.script_load(script.script)

        try:
            await self._pipeline(load)
        except StoreUnavailable as exc:
            await self.disconnect()
            raise StoreUnavailable(f"[store] url {safe_url(opts.url)!r}: cannot load the scripts ({exc.why})") from None

    def _queue(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        """Queue script ``name`` on ``pipe`` by its SHA (EVALSHA).

        Not through redis-py's Script on a pipeline: that costs a SCRIPT EXISTS round trip
        before every pipeline, doubling the round trips of the background writer.
        """
        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)

    async def _pipeline(self, build: Callable[[Any], None], seconds: float | None = None) -> list[Any]:
        """Execute the pipeline ``build`` queues (errors in the results); StoreUnavailable if Redis fails.

        When Redis lost its scripts (it restarted), they are loaded again and the pipeline
        built and executed once more.
        """

        async def send() -> list[Any]:
            pipe = self._client().pipeline(transaction=False)
            build(pipe)
            results: list[Any] = await self._call(pipe.execute(raise_on_error=False), seconds)
            return results

        return await self._with_scripts(send)

    async def _execute(self, commands: Sequence[Sequence[str | int]]) -> list[Any]:
        """Send ``commands`` in one write on one pooled connection; their replies (error replies as exceptions).

        What the background writer sends, many times a second: through redis-py's own pool,
        connections and reply parser, but packed here, not by its Pipeline, which packs every
        argument through several layers and bounds every reply's read on its own (most of the
        writer's CPU per streamed chunk, docs/performance.md R7). Arguments are str or int.
        Bounded and failing as :meth:`_call` does; when Redis lost its scripts they are loaded
        again and the commands sent once more, as :meth:`_pipeline` does.
        """
        packed = b"".join(_pack(command) for command in commands)

        async def send() -> list[Any]:
            results: list[Any] = await self._call(self._send(packed, len(commands)))
            return results

        return await self._with_scripts(send)

    async def _with_scripts(self, send: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
        """``send()``'s replies; when Redis had lost the scripts (it restarted), loaded again and sent once more."""
        import redis.exceptions

        results = await send()
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
            load = self._client().pipeline(transaction=False)
            for script in self._scripts.values():
                load.script_load(script.script)
            await self._call(load.execute())
            results = await send()
        refused = sum(1 for r in results if isinstance(r, redis.exceptions.OutOfMemoryError))
        if refused:
            self._filled(refused)
        return results

    async def _send(self, packed: bytes, replies: int) -> list[Any]:
        import redis.exceptions

        pool = self._client().connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(packed, check_health=False)
            results: list[Any] = []
            for _ in range(replies):
                try:
                    # No timeout per reply (math.inf): the whole exchange is bounded by _call.
                    results.append(await conn.read_response(timeout=math.inf))
                except redis.exceptions.ResponseError as exc:
                    results.append(exc)
        except BaseException:
            # Replies may be left unread (a timeout, a cancellation): the connection cannot be reused.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return results

    async def _shared(self, *command: Any) -> Any:
        """Send ``command`` in one write with every other one awaited in this round of the event loop.

        A burst of resumes (each a ``GET`` then a ``CLAIM``) otherwise takes a pooled connection
        per call at once: the pool opens a new one for each (a connect and a handshake: most of
        a resume's time on the other process, docs/performance.md R8). Bounded and failing as
        :meth:`_call` does.
        """
        return await self._call(self._shared_reply(*command))

    def _shared_reply(self, *command: Any) -> asyncio.Future[Any]:
        """:meth:`_shared`'s reply to come, unbounded: it comes (or fails) even when its caller gave up.

        For a call whose effect its caller must undo when it stops waiting (a claim): awaited
        through :func:`asyncio.shield`, the reply still arrives after the caller was cancelled.
        """
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._calls:
            asyncio.get_running_loop().call_soon(self._send_shared)
        self._calls.append((command, waiter))
        return waiter

    def _send_shared(self) -> None:
        calls, self._calls = self._calls, []
        task = asyncio.create_task(self._execute_shared(calls))
        self._sending.add(task)  # a strong reference until it is done
        task.add_done_callback(self._sending.discard)

    async def _execute_shared(self, calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._execute([command for command, _ in calls])
        except StoreUnavailable as exc:
            results = [exc] * len(calls)
        except asyncio.CancelledError:
            results = [StoreUnavailable("the redis store is closing")] * len(calls)
        for (_, waiter), result in zip(calls, results, strict=True):
            if waiter.done():  # its caller gave up (timeout, cancelled)
                continue
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    def _shared_script(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Script ``name`` (EVALSHA) through :meth:`_shared_reply`: its reply to come, unbounded."""
        return self._shared_reply("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    async def disconnect(self) -> None:
        """Close both clients."""
        self._stop_full_check()
        redis, blocking = self._redis, self._blocking
        self._redis = self._blocking = None
        if redis is not None:
            await redis.aclose()
        if blocking is not None:
            await blocking.aclose()

    async def available(self) -> bool:
        """True unless the last call to Redis failed, or Redis is full, and a probe (≤ 1 s) still says so.

        While Redis is up this costs nothing; while it is down or full, handshakes arriving
        together share one probe (a burst of them does not become a burst of probes).
        """
        if not self._down and not self.full:
            return True
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._probe())
        return await asyncio.shield(self._checking)

    async def _probe(self) -> bool:
        # Not a PING: Redis refusing writes for a while (CLIENT PAUSE WRITE, as its FAILOVER does)
        # answers one, and every handshake was let in to wait for its session's creation in vain.
        # The RELEASE script, as every session's writes, waits then; it releases nothing (no owner
        # holds the fence "").
        # Nor the RELEASE script alone when Redis is full: it writes nothing, so a Redis refusing
        # writes for want of memory runs it, and every handshake was let in to have its session's
        # creation refused (1011). LPUSHX of a key that never exists writes nothing either, but
        # Redis refuses it when full (it may use memory), and it waits while writes are paused.
        seconds = min(self.options.timeout, 1.0)
        refusals = self._refusals
        try:
            if self.full:
                await self._call(self._client().lpushx(self.options.key_prefix + "probe", "0"), seconds)
            else:
                await self._call(self._scripts["RELEASE"](keys=self._keys("probe"), args=[""]), seconds)
        except StoreUnavailable:
            self._refusals = refusals  # the probe's own refusal is not one of the writes counted
            return False
        self._has_room()
        return True

    def _client(self) -> Any:
        if self._redis is None:
            raise StoreUnavailable("the redis store is not started")
        return self._redis

    def _blocking_client(self) -> Any:
        if self._blocking is None:
            raise StoreUnavailable("the redis store is not started")
        return self._blocking

    def _keys(self, session_id: str) -> list[str]:
        return session_keys(self.options.key_prefix, session_id)

    async def _call(self, call: Any, seconds: float | None = None) -> Any:
        """Await one Redis call within ``seconds`` (default: ``timeout``); any failure is StoreUnavailable."""
        import redis.exceptions  # imported by connect() already

        timeout = self.options.timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(timeout):
                result = await call
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py turns a cancellation into a connection error (and asyncio.timeout may
                # take one for its own): the caller was cancelled, so it must stop.
                raise asyncio.CancelledError from None
            # An error reply means Redis is up; anything else: handshakes are refused (503) till it answers.
            self._down = not isinstance(exc, redis.exceptions.ResponseError)
            if refused_full(exc):
                self._filled()
                raise StoreUnavailable("Redis is full (its maxmemory reached): it refuses writes") from None
            if isinstance(exc, TimeoutError):
                raise StoreUnavailable(f"no answer from Redis within {timeout:g} s") from None
            raise StoreUnavailable(f"Redis failed ({type(exc).__name__})", detail=str(exc)) from None
        self._down = False
        return result


def _pack(command: Sequence[str | int]) -> bytes:
    """One command in RESP (what redis-py sends), its str arguments as UTF-8 with lone surrogates kept.

    By hiredis's packer when it is installed (the ``redis`` extra installs it): a batch of
    streamed frames is packed in under half the time. It refuses a lone surrogate, which a
    client's JSON may carry (``"\\ud800"``) and Redis stores as any bytes: such a command is
    packed here.
    """
    c_pack = _c_packer()
    if c_pack is not None:
        try:
            return c_pack(tuple(command))
        except UnicodeEncodeError:
            pass
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg.encode("utf-8", "surrogatepass") if isinstance(arg, str) else b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@functools.cache
def _c_packer() -> Callable[[tuple[str | int, ...]], bytes] | None:
    """hiredis's ``pack_command``, or None without hiredis (or one older than 2.1, which lacks it)."""
    try:
        import hiredis
    except ImportError:
        return None
    packer: Callable[[tuple[str | int, ...]], bytes] | None = getattr(hiredis, "pack_command", None)
    return packer


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds, at least 1 (Redis refuses an expiry of 0)."""
    return max(1, round(seconds * 1000))


def ttl_seconds(session: ChatSession | None) -> float:
    """How long a session's keys outlive its last write: ``session_timeout + resume_window`` (a day if unknown)."""
    if session is None:
        return 86400.0
    opts = session.sessions.options
    return float(opts.session_timeout + opts.resume_window)


def ttl(session: ChatSession) -> int:
    """:func:`ttl_seconds` in milliseconds."""
    return ms(ttl_seconds(session))
