"""The gateway's per-event-loop background round (publishing in-flight counts, writing usage) ends when its
loop shuts down, even when a call inside a round swallows the cancellation (Python 3.11's `asyncio.wait_for`
can, when its inner future completes in the same iteration). Under Django's test client and any
`async_to_sync` caller every request runs in a loop of its own that `asyncio.run` closes by cancelling what is
left: a round that kept going held that close, and with it the request, for ever."""

import asyncio
import threading

from llmhub.gateway import load


def test_a_round_that_swallows_its_cancellation_still_ends_with_its_loop(monkeypatch):
    entered = []

    async def publish_swallowing_the_cancel():
        entered.append(True)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # what a library racing its own timeout may do

    async def nothing_to_write():
        return 0

    monkeypatch.setattr(load, "PUBLISH_INTERVAL", 0.01)
    monkeypatch.setattr(load, "publish_inflight", publish_swallowing_the_cancel)
    monkeypatch.setattr(load.usage_buffer, "flush", nothing_to_write)
    monkeypatch.setattr(load.request_log, "flush", nothing_to_write)

    async def one_request():
        load.ensure_background()
        while not entered:
            await asyncio.sleep(0.01)

    loop_thread = threading.Thread(target=asyncio.run, args=(one_request(),), daemon=True)
    loop_thread.start()
    loop_thread.join(timeout=5)

    assert entered
    assert not loop_thread.is_alive(), "the event loop never closed: the background round outlived its cancellation"
