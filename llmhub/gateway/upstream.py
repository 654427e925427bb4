"""The gateway's HTTP/1.1 client to engines: one POST per request over pooled keep-alive connections.

Protocol: HTTP/1.1 (RFC 9112) over plain TCP, as vLLM's OpenAI-compatible server speaks it on the address
it publishes to the gateway. Built on an asyncio Protocol and httptools' C response parser (uvicorn's,
already a dependency) instead of httpx: the request goes out in one write, bodies (Content-Length or
chunked, decoded by the parser) come back as the bytes arrive, with no per-request client machinery
(cookies, redirects, auth flows, anyio cancel scopes). Profiled, httpx was about a third of the gateway's
CPU per request.

A stream's body can be piped (`Response.pipe`): what each read brings goes to a callback from the
connection's read callback, with no task woken per piece (a task switch and its awaits were most of the
gateway's CPU per relayed chunk), marked when it ends the body.

Connections are pooled per (host, port) and event loop; a connection goes back to the pool only after a
complete response that allows keep-alive. Closing a response before its end closes the connection, which
is how a client's disconnect aborts the engine's work. Timeouts: connect `CONNECT_TIMEOUT` s; every wait
for the response's head or its next bytes GATEWAY_UPSTREAM_TIMEOUT s.

Errors: `ConnectFailed` (nothing was sent: another instance may be tried), `UpstreamError` (the engine
broke off, timed out or answered something that is not HTTP).
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

import httptools
from django.conf import settings

CONNECT_TIMEOUT = 5.0  # seconds
MAX_IDLE_PER_ENGINE = 256  # idle keep-alive connections kept per (host, port) and event loop
MAX_BUFFERED = 256 * 1024  # bytes of an answer held for a slow reader before the engine is read no further


class UpstreamError(Exception):
    """The engine failed to answer: broke off, timed out, or sent something that is not HTTP/1.1."""


class ConnectFailed(UpstreamError):
    """No connection to the engine could be made (refused, unreachable, connect timeout); nothing was sent."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses one response at a time into status, headers and body pieces."""

    def __init__(self, key: tuple[str, int]):
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)  # one per connection: it parses response after response
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.received = False  # any byte of this response yet
        self.pieces: collections.deque[bytes] = collections.deque()
        self.buffered = 0  # bytes in `pieces`
        self.paused = False
        self.held = False  # reading paused by the reader of a piped response (`Response.pause_reading`)
        self.sink: Callable[[bytes, bool], None] | None = None  # takes the body as it comes (`pipe`)
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.quiet_since: float | None = None  # loop time since when the engine sent nothing, while waited for

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamError(f"not an HTTP response: {exc}")
            self.close()
        if self.sink is not None:
            if self.pieces and self.error is None:
                self._deliver()
            if not self.complete and self.error is None:
                return  # the reader waits for the end only
        self._wake()

    def _deliver(self) -> None:
        """Give the pieces received to the sink at once, with whether they end the body."""
        pieces = self.pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.buffered = 0
        self.quiet_since = self.loop.time()  # the engine is not silent: `wait` goes on waiting
        try:
            self.sink(data, self.complete)
        except Exception as exc:  # noqa: BLE001 - the relay's own failure ends the response; `finished` raises it
            self.error = exc
            self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete and self.head_done and "content-length" not in self.headers \
                and "chunked" not in self.headers.get("transfer-encoding", ""):  # fmt: skip
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete and self.error is None:
            self.error = UpstreamError(f"the connection closed mid-answer ({exc!r})")
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is complete
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(bytes(body))
        self.buffered += len(body)
        if self.buffered > MAX_BUFFERED and not self.paused and self.sink is None and self.transport is not None:
            self.paused = True  # backpressure: TCP holds the rest until the reader catches up
            self.transport.pause_reading()

    def take(self) -> bytes:
        """The oldest body piece received (there must be one); reading resumes once the reader caught up."""
        piece = self.pieces.popleft()
        self.buffered -= len(piece)
        if self.paused and self.buffered <= MAX_BUFFERED // 2 and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return piece

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(True)

    async def wait(self, within: float | None = None) -> bool:
        """Wait for more of the response (while piped: for its end or an error): True when something came;
        False when `within` seconds passed first (call again to go on waiting). Raises UpstreamError (and
        closes the connection) once the engine sent nothing for GATEWAY_UPSTREAM_TIMEOUT s, however many waits
        that took; piped pieces count as something sent.

        One future and one timer per wait (no `asyncio.timeout` context, whose set-up and exit showed in the
        per-chunk profile)."""
        loop = self.loop
        now = loop.time()
        if self.quiet_since is None:
            self.quiet_since = now
        give_up = None if within is None else now + within
        while True:
            deadline = self.quiet_since + settings.GATEWAY_UPSTREAM_TIMEOUT
            until = deadline if give_up is None else min(deadline, give_up)
            self.waiter = waiter = loop.create_future()
            timer = loop.call_at(until, _time_up, waiter)
            try:
                came = await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if came:
                self.quiet_since = None
                return True
            if until == give_up:
                return False
            if self.quiet_since + settings.GATEWAY_UPSTREAM_TIMEOUT <= loop.time():  # no piece came meanwhile
                self.close()
                raise UpstreamError(f"no answer within {settings.GATEWAY_UPSTREAM_TIMEOUT:g} s")

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None and not self.held

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


def _time_up(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Response:
    """An engine's answer: `status`, `headers` (lower-case names), and its body by `read()` or by
    iterating (each item the bytes that arrived, transfer coding removed). `aclose()` (idempotent) gives
    the connection back when the answer was read to its end, else closes it (the engine sees the client go)."""

    def __init__(self, connection: _Connection, pool: "Pool"):
        self._conn, self._pool = connection, pool
        self.status, self.headers = connection.status, connection.headers

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        piece = await self.next()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def next(self, within: float | None = None) -> bytes | None | bool:
        """The next body piece; None at the end of the body; False when none came within `within` seconds
        (call again to go on waiting: the engine's GATEWAY_UPSTREAM_TIMEOUT runs on). Raises UpstreamError."""
        conn = self._conn
        while True:
            if conn is None:
                return None
            if conn.pieces:
                return conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return None
            if not await conn.wait(within):
                return False

    def pipe(self, sink: Callable[[bytes, bool], None]) -> None:
        """From now on give the body to `sink(data, last)` as it arrives: what each read of the connection
        brings, from its read callback (no task is woken per piece), `last` True when it ends the body (then
        no more comes); what was already received goes first. `finished` then waits for the end. An exception
        `sink` raises ends the response: `finished` raises it."""
        conn = self._conn
        conn.sink = sink
        if conn.pieces:
            conn._deliver()

    async def finished(self, within: float | None = None) -> bool:
        """For a piped response: True once the body is complete, False when `within` seconds passed first
        (call again to go on waiting). Raises UpstreamError (or what the sink raised)."""
        return await self.next(within) is None  # piped, no piece is left for `next` to return

    def pause_reading(self) -> None:
        """Read no more of the engine's answer (TCP holds it back) until `resume_reading`; a connection
        closed while held is not pooled."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.held:
            conn.held = True
            conn.transport.pause_reading()

    def resume_reading(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and conn.held:
            conn.held = False
            conn.transport.resume_reading()

    async def read(self) -> bytes:
        """The whole body. Raises UpstreamError."""
        return b"".join([piece async for piece in self])

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable() and not conn.pieces:
            self._pool.release(conn)
        else:
            conn.close()


@functools.lru_cache(maxsize=4096)
def _address(base_url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"engines are reached over plain http://host:port, not {base_url!r}")
    port = parts.port or 80
    return parts.hostname, port, (parts.netloc or f"{parts.hostname}:{port}").encode("latin-1")


class Pool:
    """Keep-alive connections to engines for one event loop."""

    def __init__(self):
        self.idle: dict[tuple[str, int], list[_Connection]] = {}

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST `body` to `base_url + path` with `headers` (plus Host, Content-Length, Content-Type
        application/json) and return the response once its head arrived.

        Raises ConnectFailed when no connection could be made (nothing sent), UpstreamError otherwise.
        A pooled connection the engine closed meanwhile is replaced by a new one transparently.
        """
        host, port, netloc = _address(base_url)
        head = [b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                % (path.encode("latin-1"), netloc, len(body))]  # fmt: skip
        head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()]
        request = b"".join(head) + b"\r\n" + body
        key = (host, port)
        while (conn := self._take(key)) is not None:  # a pooled one; the engine may have just closed it
            try:
                return await self._send(conn, request)
            except UpstreamError:
                if conn.received:
                    raise
        return await self._send(await self._connect(key), request)

    def _take(self, key) -> _Connection | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(lambda: _Connection(key), *key)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {exc!r}") from exc
        return conn

    async def _send(self, conn: _Connection, request: bytes) -> Response:
        conn._begin()
        try:
            conn.transport.write(request)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if conn.closed:
                    raise UpstreamError("the engine closed the connection before answering")
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Response(conn, self)

    def release(self, conn: _Connection) -> None:
        idle = self.idle.setdefault(conn.key, [])
        if len(idle) < MAX_IDLE_PER_ENGINE:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()


_pools: WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = WeakKeyDictionary()


def pool() -> Pool:
    """The engine connection pool of the running event loop."""
    loop = asyncio.get_running_loop()
    found = _pools.get(loop)
    if found is None:
        found = _pools[loop] = Pool()
    return found
