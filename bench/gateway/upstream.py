"""A fast local OpenAI-compatible upstream for the gateway benchmark: `POST /v1/chat/completions`
streams `max_tokens` (default CHUNKS) deltas PACE_MS apart on a fixed schedule (SSE, with a final usage chunk
when asked), or answers whole.

Run: python bench/gateway/upstream.py PORT [CHUNKS] [PACE_MS]  (a plain ASGI app under uvicorn)
"""

import asyncio
import json
import sys

import uvicorn

CHUNKS = int(sys.argv[2]) if len(sys.argv) > 2 else 16
PACE = (float(sys.argv[3]) if len(sys.argv) > 3 else 5.0) / 1000


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = json.loads(raw or b"{}")
    model = body.get("model", "bench")
    chunks = int(body.get("max_tokens") or CHUNKS)
    if not body.get("stream"):
        await asyncio.sleep(PACE * chunks)
        answer = {
            "id": "b", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * chunks}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks},
        }  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    # Chunk i leaves at start + (i + 1) × PACE, as an engine's tokens come when computed: sleeping PACE after
    # each send would let every late wake-up (the machine busy with the gateway's processes) stretch the stream.
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(chunks):
        await asyncio.sleep(max(0.0, start + (i + 1) * PACE - loop.time()))
        chunk = {"id": "b", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [{"index": 0, "delta": {"content": f"x{i} "}, "finish_reason": None}]}  # fmt: skip
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"id": "b", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                 "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}}  # fmt: skip
        await send({"type": "http.response.body", "body": f"data: {json.dumps(usage)}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
