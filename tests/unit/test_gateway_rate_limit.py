"""The per-user rate limit takes blocks of requests from Redis per web process: one round trip per block,
never past the limit over all processes, at most (processes - 1) blocks refused early."""

import asyncio

import pytest
import redis
import time_machine
from django.conf import settings

from llmhub.gateway import limits
from llmhub.gateway.errors import GatewayError
from llmhub.gateway.routing import Caller

pytestmark = pytest.mark.django_db

NOON = 1_900_000_040  # a time 20 s into a minute


def caller(limit: int, user_id: int = 424242) -> Caller:
    return Caller(user_id=user_id, username="u", token_key="k", rate_limit_per_minute=limit)


@pytest.fixture
def counter():
    """Reads the user's Redis count for NOON's window; that window's key and the next start absent."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = [f"{settings.REDIS_KEY_PREFIX}ratelimit:user:424242:{NOON // 60 + i}" for i in (0, 1)]
    client.delete(*keys)
    yield lambda: int(client.get(keys[0]) or 0)
    client.delete(*keys)


async def served(who: Caller, n: int, processes: list[dict]) -> list[bool]:
    """`n` requests spread round-robin over `processes` (each one's own lease table): True when let through."""
    results = []
    for i in range(n):
        limits._leases = processes[i % len(processes)]
        try:
            await limits.rate_limit(who)
            results.append(True)
        except GatewayError as exc:
            assert exc.status == 429 and exc.retry_after == 40
            results.append(False)
    return results


@time_machine.travel(NOON, tick=False)
def test_a_process_takes_a_block_of_requests_per_redis_round_trip(counter):
    async def scenario():
        counts = []
        for _ in range(6):
            await served(caller(3000), 1, [limits._leases])
            counts.append(counter())
        return counts

    assert asyncio.run(scenario()) == [3, 3, 3, 6, 6, 6]  # a block is 3000 / 1000 requests


@time_machine.travel(NOON, tick=False)
@pytest.mark.parametrize("limit, processes", [(4, 2), (10, 3), (2000, 2), (5000, 3)])
def test_never_past_the_limit_over_all_processes(counter, limit, processes):
    results = asyncio.run(served(caller(limit), limit + 20, [{} for _ in range(processes)]))

    block = max(1, limit // limits.LEASE_FRACTION)
    assert limit - (processes - 1) * block <= sum(results) <= limit
    if block == 1:  # small limits are exact
        assert results == [True] * limit + [False] * 20


def test_a_new_minute_starts_a_new_count(counter):
    with time_machine.travel(NOON, tick=False):
        assert asyncio.run(served(caller(2), 3, [{}])) == [True, True, False]
    with time_machine.travel(NOON + 60, tick=False):
        assert asyncio.run(served(caller(2), 3, [limits._leases])) == [True, True, False]
