"""Holding requests for a deployment with no ready instance: one poller per held deployment per process.

Every request held for the same (user, model) in one event loop awaits the same poller task, which looks
for a ready instance every `POLL_INTERVAL` seconds (one route load per look, however many requests wait)
and stops when one is found, the deployment is gone, failed, suspended or cannot be placed now, or no request
waits any more.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from llmhub.deployments.models import Deployment

from .routing import Caller, Route, cache

POLL_INTERVAL = 0.5  # seconds between two looks for a ready instance while requests are held
_SETTLED = {Deployment.Status.FAILED, Deployment.Status.SUSPENDED}


@dataclass
class _Poller:
    task: asyncio.Task
    waiting: int = 0


_pollers: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, str], _Poller]] = WeakKeyDictionary()


async def _watch(caller: Caller, model: str) -> Route | None:
    while not asyncio.current_task().cancelling():  # also when a call swallowed the cancellation
        await asyncio.sleep(POLL_INTERVAL)
        cache.forget(caller, model)
        fresh = await cache.route(caller, model)
        # A live deployment with a fail_reason has instances that cannot be placed now (no capacity).
        if fresh is None or fresh.instances or fresh.status in _SETTLED or fresh.fail_reason:
            return fresh
    raise asyncio.CancelledError


async def route_when_ready(caller: Caller, model: str, timeout: float) -> Route | None:
    """The caller's route for `model` once it has a ready instance, or once it was deleted (None), failed,
    suspended or has instances that cannot be placed (a `fail_reason`; the caller checks). Raises TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    pollers = _pollers.setdefault(loop, {})
    key = (caller.user_id, model)
    poller = pollers.get(key)
    if poller is None or poller.task.done():
        poller = pollers[key] = _Poller(loop.create_task(_watch(caller, model)))
    poller.waiting += 1
    try:
        return await asyncio.wait_for(asyncio.shield(poller.task), max(timeout, 0))
    finally:
        poller.waiting -= 1
        if poller.waiting == 0:
            if not poller.task.done():
                poller.task.cancel()
            if pollers.get(key) is poller:
                del pollers[key]
