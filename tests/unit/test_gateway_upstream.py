"""The gateway's HTTP/1.1 client to engines (`gateway.upstream`) against raw sockets the test controls, and
the byte-level handling of bodies and usage (`gateway.messages`)."""

import asyncio
import json

import pytest

from llmhub.gateway import messages, upstream
from llmhub.gateway.errors import GatewayError


class RawEngine:
    """A TCP server answering each request with the next canned bytes; records connections and requests."""

    def __init__(self, answers):
        self.answers, self.connections, self.requests, self.closed = list(answers), 0, [], asyncio.Event()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def serve(self, reader, writer):
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))  # fmt: skip
                self.requests.append((head, await reader.readexactly(length)))
                answer = self.answers.pop(0)
                for piece in answer if isinstance(answer, list) else [answer]:
                    if piece == "close":
                        writer.close()
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


WHOLE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'


def chunked(*pieces: bytes) -> list[bytes]:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return [head, *(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces), b"0\r\n\r\n"]


def run(coro):
    return asyncio.run(coro)


def test_requests_reuse_one_keep_alive_connection_and_send_the_body_as_given():
    async def scenario():
        async with RawEngine([WHOLE, WHOLE, WHOLE]) as engine:
            bodies = []
            for i in range(3):
                response = await upstream.pool().post(engine.url, "/v1/completions", b'{"n": %d}' % i,
                                                      {"Authorization": "Bearer k"})  # fmt: skip
                bodies.append((response.status, response.headers["content-type"], await response.read()))
                await response.aclose()
            return engine, bodies

    engine, bodies = run(scenario())

    assert bodies == [(200, "application/json", b'{"ok": true}')] * 3
    assert engine.connections == 1
    head, body = engine.requests[2]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and b"\r\nAuthorization: Bearer k\r\n" in head
    assert body == b'{"n": 2}'


def test_a_chunked_stream_arrives_piece_by_piece_without_its_transfer_coding():
    async def scenario():
        async with RawEngine([chunked(b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n")]) as engine:
            response = await upstream.pool().post(engine.url, "/v1/chat/completions", b"{}", {})
            pieces = [piece async for piece in response]
            await response.aclose()
            return pieces

    assert run(scenario()) == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]


def test_a_connection_the_engine_closed_while_pooled_is_replaced():
    async def scenario():
        async with RawEngine([[WHOLE, "close"], WHOLE]) as engine:
            first = await upstream.pool().post(engine.url, "/v1/completions", b"{}", {})
            await first.read()
            await first.aclose()
            await asyncio.sleep(0.05)
            second = await upstream.pool().post(engine.url, "/v1/completions", b"{}", {})
            return await second.read(), engine.connections

    assert run(scenario()) == (b'{"ok": true}', 2)


def test_closing_a_response_before_its_end_closes_the_connection():
    async def scenario():
        async with RawEngine([chunked(b"data: 1\n\n", *[b"data: more\n\n"] * 50)]) as engine:
            response = await upstream.pool().post(engine.url, "/v1/chat/completions", b"{}", {})
            await response.__anext__()
            await response.aclose()
            await asyncio.wait_for(engine.closed.wait(), 5)  # the engine sees the client go
            return upstream.pool().idle

    assert all(not idle for idle in run(scenario()).values())


def test_connect_failures_and_broken_answers_raise_distinct_errors(settings):
    settings.GATEWAY_UPSTREAM_TIMEOUT = 0.3

    async def connect_refused():
        async with RawEngine([]) as engine:
            url = engine.url
        await upstream.pool().post(url, "/v1/completions", b"{}", {})

    async def answer(canned):
        async with RawEngine([canned]) as engine:
            response = await upstream.pool().post(engine.url, "/v1/completions", b"{}", {})
            return await response.read()

    with pytest.raises(upstream.ConnectFailed):
        run(connect_refused())
    for canned in (b"SSH-2.0-OpenSSH\r\n\r\n", [WHOLE[:-4], "close"], [WHOLE[:-4]]):  # not HTTP, cut, silent
        with pytest.raises(upstream.UpstreamError) as raised:
            run(answer(canned))
        assert not isinstance(raised.value, upstream.ConnectFailed)


def test_short_waits_for_the_first_token_return_and_the_engines_silence_still_times_out(settings):
    # The gateway waits for a stream's first token a keepalive interval at a time (`next(within=...)`); those
    # waits must not restart the engine's GATEWAY_UPSTREAM_TIMEOUT, or a silent engine would be waited on forever.
    settings.GATEWAY_UPSTREAM_TIMEOUT = 0.5
    head = chunked()[0]

    async def scenario(pieces):
        async with RawEngine([pieces]) as engine:
            response = await upstream.pool().post(engine.url, "/v1/chat/completions", b"{}", {})
            results, start = [], asyncio.get_running_loop().time()
            try:
                while (piece := await response.next(within=0.1)) is not None:
                    results.append(piece)
            except upstream.UpstreamError as exc:
                results.append(exc)
            return results, asyncio.get_running_loop().time() - start

    silent, took = run(scenario([head]))
    assert silent[:3] == [False] * 3 and isinstance(silent[-1], upstream.UpstreamError), silent
    assert 0.45 <= took < 1.5
    # An engine that sends before its timeout is waited on again from then on; its pieces come through.
    events = [b"%x\r\n%s\r\n" % (len(p), p) for p in (b"data: 1\n\n", b"data: 2\n\n")]
    slow = [head, *[b""] * 35, events[0], *[b""] * 35, events[1], b"0\r\n\r\n"]  # ~0.35 s between pieces
    answered, _ = run(scenario(slow))
    assert [p for p in answered if p] == [b"data: 1\n\n", b"data: 2\n\n"] and False in answered


def test_the_engine_gets_the_clients_bytes_with_usage_asked_for_streams_only():
    raw = b'{"model": "a/b",  "messages": [{"role": "user", "content": "\\u00e9t\\u00e9"}], "stream": true}\n'
    body = messages.parse_body(raw)

    patched = messages.engine_payload(raw, body, stream=True)

    assert patched.startswith(raw.rstrip()[:-1]) and json.loads(patched)["stream_options"] == {"include_usage": True}
    assert messages.engine_payload(raw, {**body, "stream": False}, stream=False) == raw
    given = {**body, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    assert json.loads(messages.engine_payload(json.dumps(given).encode(), given, stream=True))["stream_options"] == {
        "include_usage": True, "continuous_usage_stats": True}  # fmt: skip
    utf16 = json.dumps(body).encode("utf-16")
    assert json.loads(messages.engine_payload(utf16, body, stream=True))["stream_options"] == {"include_usage": True}
    with pytest.raises(GatewayError):
        messages.parse_body(b'{"model": "a/b", "stream_options": null}')


@pytest.mark.parametrize(
    "content, usage",
    [
        (b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}', {"prompt_tokens": 3,
                                                                                   "completion_tokens": 2}),
        (b'{"usage": {"prompt_tokens": 1}, "choices": [{"text": "\\"usage\\": {\\"x\\": 1}"}]}', {"prompt_tokens": 1}),
        (b'{"choices": [{"text": "usage"}], "note": "usage"}', None),
        (b'{"choices": []}', None),
        (b"not json", None),
    ],
)  # fmt: skip
def test_usage_is_read_from_a_whole_answer(content, usage):
    assert messages.usage_of(content) == usage


def test_the_usage_only_chunk_is_taken_and_dropped_unless_asked():
    events = (b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}\n\n'
              b"data: [DONE]\n\n")  # fmt: skip

    assert messages.has_usage(events)
    assert not messages.has_usage(events.split(b"\n\n")[0] + b"\n\n")
    kept, usage = messages.without_usage_event(events, keep=False)
    assert usage == {"prompt_tokens": 4, "completion_tokens": 1}
    assert b'"choices": []' not in kept and kept.endswith(b"data: [DONE]\n\n") and b'"content": "a"' in kept
    assert messages.without_usage_event(events, keep=True) == (events, usage)


def test_a_slow_reader_holds_back_the_engine_instead_of_buffering_its_answer(monkeypatch):
    monkeypatch.setattr(upstream, "MAX_BUFFERED", 1024)
    piece = b"data: " + b"x" * 500 + b"\n\n"

    async def scenario():
        async with RawEngine([chunked(*[piece] * 200)]) as engine:
            response = await upstream.pool().post(engine.url, "/v1/chat/completions", b"{}", {})
            await asyncio.sleep(0.5)  # the engine writes as fast as it can; nobody reads
            held = response._conn.buffered
            pieces = [p async for p in response]
            await response.aclose()
            return held, pieces

    held, pieces = run(scenario())

    assert held < 1024 + len(piece) + 64 * 1024  # the cap, one piece past it, and what one socket read brings
    assert pieces == [piece] * 200


def test_a_piped_stream_reaches_its_sink_as_it_comes_and_only_silence_times_it_out(settings):
    # Piped (`Response.pipe`), each read's pieces go to the sink from the connection's read callback, the
    # last marked, and the waiting task hears only the end. Pieces count as the engine speaking: a stream longer
    # than GATEWAY_UPSTREAM_TIMEOUT that never goes quiet for that long completes; one that goes quiet times out.
    settings.GATEWAY_UPSTREAM_TIMEOUT = 0.5
    head = chunked()[0]
    events = [b"data: %d\n\n" % i for i in range(4)]

    async def scenario(pieces, sink=None):
        async with RawEngine([pieces]) as engine:
            response = await upstream.pool().post(engine.url, "/v1/chat/completions", b"{}", {})
            got, waits, loop = [], 0, asyncio.get_running_loop()
            response.pipe(sink or (lambda data, last: got.append((data, last))))
            start = loop.time()
            try:
                while not await response.finished(within=0.1):
                    waits += 1
                outcome = "complete"
            except Exception as exc:  # noqa: BLE001 - the test looks at which
                outcome = exc
            return got, outcome, waits, loop.time() - start

    steady = [head]
    for event in events:  # ~0.3 s apart: 1.2 s in all, past the 0.5 s timeout
        steady += [*[b""] * 30, b"%x\r\n%s\r\n" % (len(event), event)]
    steady[-1] += b"0\r\n\r\n"  # the last event and the end of the body in one write
    got, outcome, waits, took = run(scenario(steady))
    assert outcome == "complete" and got == [(event, event == events[-1]) for event in events] and took > 1.0
    assert waits >= 8  # `within` still returns to the caller (for keepalives) while pieces go to the sink

    got, outcome, _, took = run(scenario([head]))
    assert got == [] and isinstance(outcome, upstream.UpstreamError) and 0.45 <= took < 1.5

    def failing(data, last):
        raise ValueError("the relay failed")

    _, outcome, _, _ = run(scenario(steady[:32], sink=failing))
    assert isinstance(outcome, ValueError)  # the sink's own error, not passed off as the engine's


def test_a_client_that_stops_reading_holds_the_engine_back_and_loses_no_piece():
    # `BodyWriter` sends a stream's pieces from the read callback, its head before the first. When the server's
    # send suspends (its client is not reading), later pieces queue in order and the engine is not read until
    # they are all sent; nothing goes out after the last piece.
    from llmhub.gateway.asgi import BodyWriter

    async def scenario(leave: bool):
        reading = asyncio.Event()
        sent, calls = [], []

        async def send(message):
            if message["type"] == "http.response.start":
                sent.append(message["status"])
                return
            try:
                if message["body"] == b"2":
                    await reading.wait()
            except asyncio.CancelledError:
                calls.append("cancelled")
                raise
            sent.append(message["body"])

        outlet = messages.Outlet(pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume"))
        writer = BodyWriter(send, outlet, 200, [])
        for piece in (b"1", b"2", b"3", b"4"):
            outlet.write(piece)
        await asyncio.sleep(0.05)
        held = (list(sent), list(calls))
        if leave:  # the client went away: the send under way is stopped
            writer.close()
            await asyncio.sleep(0)
            return held, sent, calls
        reading.set()
        writer.write(b"5", more=False)
        writer.write(b"late")
        await writer.drain()
        return held, sent, calls

    held, sent, calls = run(scenario(leave=False))
    assert held == ([200, b"1"], ["pause"])
    assert sent == [200, b"1", b"2", b"3", b"4", b"5"] and calls == ["pause", "resume"]

    held, sent, calls = run(scenario(leave=True))
    assert held == ([200, b"1"], ["pause"]) and sent == [200, b"1"] and calls == ["pause", "cancelled", "resume"]
