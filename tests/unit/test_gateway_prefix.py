"""Prefix-aware routing: consistent hashing with bounded loads over block-aligned prompt prefixes."""

import math
import random

import pytest

from llmhub.gateway import load, prefix
from llmhub.gateway.routing import Route


def system_prompt(n: int) -> str:
    return f"System prompt number {n}: " + "you answer questions about the catalogue politely. " * 12


def chat(system: str, user: str) -> dict:
    return {"model": "a/m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def route(ids, routing="prefix", max_batch_size=0) -> Route:
    return Route(1, 1, "a/m", "running", "", len(ids), routing=routing, max_batch_size=max_batch_size,
                 instances=[(i, f"http://127.0.0.1:{9000 + i}", "k") for i in ids])  # fmt: skip


@pytest.fixture(autouse=True)
def no_outstanding():
    load.outstanding.clear()
    prefix.forget()
    yield
    load.outstanding.clear()
    prefix.forget()


def home_and_away(r: Route, key: int) -> tuple[int, int]:
    home = load.instance_pick(r, set(), key)[0]
    return home, next(i for i, _, _ in r.instances if i != home)


def test_same_prefix_same_key_whatever_the_user_turn():
    keys = {prefix.prefix_key("chat/completions", chat(system_prompt(1), f"question {i}?")) for i in range(50)}
    assert len(keys) == 1 and None not in keys
    other = prefix.prefix_key("chat/completions", chat(system_prompt(2), "question 1?"))
    assert other not in keys


def test_key_is_block_aligned_and_short_prompts_have_none():
    assert prefix.prefix_key("chat/completions", chat("", "hi")) is None  # shorter than a block
    assert prefix.prefix_key("completions", {"prompt": "x" * (prefix.BLOCK_CHARS - 1)}) is None
    one_block = "a" * prefix.BLOCK_CHARS
    # only whole blocks count: text past the last whole block changes nothing
    assert prefix.prefix_key("completions", {"prompt": one_block}) == prefix.prefix_key(
        "completions", {"prompt": one_block + "tail"}
    )
    # and past PREFIX_BLOCKS blocks nothing counts
    long = "b" * (prefix.BLOCK_CHARS * prefix.PREFIX_BLOCKS)
    assert prefix.prefix_key("completions", {"prompt": long + "one"}) == prefix.prefix_key(
        "completions", {"prompt": long + "two"}
    )
    assert prefix.prefix_key("completions", {"prompt": [long, "x"]}) == prefix.prefix_key(
        "completions", {"prompt": long}
    )


def test_chat_content_parts_and_odd_shapes():
    text = system_prompt(3)
    parts = {"model": "a/m", "messages": [{"role": "system", "content": [{"type": "text", "text": text}]}]}
    plain = {"model": "a/m", "messages": [{"role": "system", "content": text}]}
    assert prefix.prefix_key("chat/completions", parts) == prefix.prefix_key("chat/completions", plain)
    for odd in ({"messages": "x" * 500}, {"messages": [1, None, {"content": 5}]}, {"prompt": [1, 2, 3]}, {}):
        assert prefix.prefix_key("chat/completions", odd) is None
        assert prefix.prefix_key("completions", odd) is None
    # the role is part of the prefix: the same text as a user message is another prefix
    as_user = {"model": "a/m", "messages": [{"role": "user", "content": text}]}
    assert prefix.prefix_key("chat/completions", as_user) != prefix.prefix_key("chat/completions", plain)


def test_same_prefix_goes_to_the_same_instance_and_prefixes_spread():
    r = route([11, 12, 13])
    chosen = {}
    for n in range(60):
        picks = {load.instance_pick(r, set(), prefix.prefix_key("chat/completions", chat(system_prompt(n), f"q{i}")))[0]
                 for i in range(5)}  # fmt: skip
        assert len(picks) == 1
        chosen[n] = picks.pop()
    counts = [list(chosen.values()).count(i) for i in (11, 12, 13)]
    assert min(counts) >= 10, counts  # 60 prefixes over 3 instances: each gets a share


def test_load_bound_is_respected():
    ids = [1, 2, 3, 4]
    r = route(ids)
    rng = random.Random(7)
    hot = prefix.prefix_key("chat/completions", chat(system_prompt(0), "q"))
    for step in range(400):
        key = hot if rng.random() < 0.7 else rng.getrandbits(64)  # a hot prefix: most requests share it
        choice = load.instance_pick(r, set(), key)[0]
        total = sum(load.outstanding[i] for i in ids)
        assert load.outstanding[choice] + 1 <= math.ceil(prefix.LOAD_FACTOR * (total + 1) / len(ids))
        load.outstanding[choice] += 1
        if step % 3 == 0:  # some requests finish
            busiest = max(ids, key=lambda i: load.outstanding[i])
            load.outstanding[rng.choice([busiest, *ids])] -= 1
            for i in ids:
                load.outstanding[i] = max(0, load.outstanding[i])
    loads = [load.outstanding[i] for i in ids]
    assert max(loads) <= math.ceil(prefix.LOAD_FACTOR * sum(loads) / len(ids)) + 1, loads


def test_preferred_instance_past_its_share_sends_the_request_elsewhere():
    key = prefix.prefix_key("chat/completions", chat(system_prompt(5), "q"))
    r = route([1, 2])
    home = load.instance_pick(r, set(), key)[0]
    away = 1 if home == 2 else 2
    load.outstanding.update({home: 3, away: 2})  # 3 + 1 ≤ ceil(1.25 × 6 / 2) = 4: still within its share
    assert load.instance_pick(r, set(), key)[0] == home
    load.outstanding.update({home: 4, away: 1})  # 4 + 1 > ceil(1.25 × 6 / 2) = 4: past it
    assert load.instance_pick(r, set(), key)[0] == away


def test_an_instance_with_free_batch_slots_keeps_its_prefixes():
    key = prefix.prefix_key("chat/completions", chat(system_prompt(5), "q"))
    r = route([1, 2], max_batch_size=8)  # floor: 4 outstanding
    home = load.instance_pick(r, set(), key)[0]
    away = 1 if home == 2 else 2
    load.outstanding.update({home: 3, away: 0})  # 4 > ceil(1.25 × 4 / 2) = 3, but 4 ≤ the floor
    assert load.instance_pick(r, set(), key)[0] == home
    load.outstanding.update({home: 4, away: 0})  # 5 > max(3, 4): past its share
    assert load.instance_pick(r, set(), key)[0] == away
    assert load.instance_pick(route([1, 2], max_batch_size=0), set(), key)[0] == away  # no floor


def test_no_instance_is_given_a_request_past_its_bound_or_queued_while_another_has_room():
    # Every state with up to 20 in flight over 2 instances, max batch size 8 (floor 4): the pick is within
    # max(ceil(1.25 × (total + 1) / 2), 4), and never a 9th request for an engine while the other has a free slot.
    key = prefix.prefix_key("chat/completions", chat(system_prompt(9), "q"))
    r = route([1, 2], max_batch_size=8)
    for a in range(21):
        for b in range(21 - a):
            load.outstanding.update({1: a, 2: b})
            chosen = load.instance_pick(r, set(), key)[0]
            after = {1: a, 2: b}
            after[chosen] += 1
            assert after[chosen] <= max(math.ceil(prefix.LOAD_FACTOR * (a + b + 1) / 2), 4), (a, b, chosen)
            assert after[chosen] <= 8 or min(a, b) >= 8, (a, b, chosen)


def test_an_instance_at_its_max_batch_size_is_past_its_share_while_another_has_free_slots():
    # CHWBL alone would let the prefix's instance run 9 (≤ ceil(1.25 × 15 / 2) = 10), one past the
    # deployment's max batch size of 8, where the engine queues it, while the other has 2 free slots.
    key = prefix.prefix_key("chat/completions", chat(system_prompt(5), "q"))
    r = route([1, 2], max_batch_size=8)
    home, away = home_and_away(r, key)
    load.outstanding.update({home: 8, away: 6})
    assert load.instance_pick(r, set(), key)[0] == away
    load.outstanding.update({home: 8, away: 8})  # both full: CHWBL's bound alone decides (ceil(1.25 × 17 / 2) = 11)
    prefix.forget()
    assert load.instance_pick(r, set(), key)[0] == home
    load.outstanding.update({home: 7, away: 6})  # a free slot left: it stays
    assert load.instance_pick(r, set(), key)[0] == home


def test_a_request_past_the_bound_goes_elsewhere_and_its_prefix_stays_home():
    key = prefix.prefix_key("chat/completions", chat(system_prompt(5), "q"))
    r = route([1, 2])
    home, away = home_and_away(r, key)
    load.outstanding.update({home: 3, away: 0})
    assert load.instance_pick(r, set(), key)[0] == away  # an overflow, not a move: the prefix still lives home
    load.outstanding.update({home: 0, away: 1})
    assert load.instance_pick(r, set(), key)[0] == home
    # a removed instance's prefixes go to the ring's choice among those left
    assert load.instance_pick(route([away, 99]), set(), key)[0] == prefix.walk((away, 99), key)[0]


def skewed_prefixes() -> list[int]:
    """16 prefix keys whose owners on the ring of instances 1 and 2 split 11 / 5."""
    keys = [prefix.prefix_key("chat/completions", chat(system_prompt(n), "q")) for n in range(400)]
    owned = {i: [k for k in keys if prefix.walk((1, 2), k)[0] == i] for i in (1, 2)}
    return owned[1][:11] + owned[2][:5]


def test_prefixes_are_spread_evenly_over_the_instances_whatever_the_ring_split():
    # Few prefixes: consistent hashing balances them only on average, and an engine's KV cache holds so
    # many. The 11 / 5 prefixes live 8 / 8, and each keeps its instance.
    skewed = skewed_prefixes()
    first = {k: prefix.pick([1, 2], {}, k, now=0.0) for k in skewed}
    assert sorted(list(first.values()).count(i) for i in (1, 2)) == [8, 8]
    for n in range(5):
        assert {k: prefix.pick([1, 2], {}, k, now=float(n)) for k in reversed(skewed)} == first
    # a third instance takes only those past the others' share (ceil(16 / 3) = 6), and new prefixes
    third = {k: prefix.pick([1, 2, 3], {}, k, now=9.0) for k in skewed}
    assert sorted(list(third.values()).count(i) for i in (1, 2, 3)) == [4, 6, 6]
    assert all(third[k] in (first[k], 3) for k in skewed)


def test_a_prefix_not_seen_for_a_while_is_forgotten(monkeypatch):
    keys = [prefix.prefix_key("chat/completions", chat(system_prompt(n), "q")) for n in range(20)]
    for k in keys[:10]:
        prefix.pick([1, 2], {}, k, now=0.0)
    prefix.pick([1, 2], {}, keys[0], now=prefix.HOME_SECONDS - 1)  # seen again: kept
    prefix.pick([1, 2], {}, keys[10], now=prefix.HOME_SECONDS + 1)
    assert set(prefix.homes) == {keys[0], keys[10]}
    monkeypatch.setattr(prefix, "HOMES_MAX", 5)
    for k in keys:
        prefix.pick([1, 2], {}, k, now=prefix.HOME_SECONDS + 2)
    assert list(prefix.homes) == keys[-5:]  # the most recent ones
    held = [prefix.homes[k][0] for k in prefix.homes]
    assert all(prefix._held[i] == held.count(i) for i in (1, 2))


def closed_loop(r: Route, keys: list[int], requests: int, concurrency: int, seed: int) -> tuple[dict, int, int]:
    """Requests at `concurrency` (one finishes, chosen at random, before the next starts): the requests
    per instance, the most ever outstanding on one, and how often a prefix went elsewhere than the last time."""
    rng = random.Random(seed)
    ids = [i for i, _, _ in r.instances]
    running: list[int] = []
    per_instance = dict.fromkeys(ids, 0)
    last: dict[int, int] = {}
    moves = most = 0
    for _ in range(requests):
        if len(running) == concurrency:
            load.outstanding[running.pop(rng.randrange(len(running)))] -= 1
        key = rng.choice(keys)
        chosen = load.instance_pick(r, set(), key)[0]
        moves += key in last and last[key] != chosen
        last[key] = chosen
        load.outstanding[chosen] += 1
        running.append(chosen)
        per_instance[chosen] += 1
        most = max(most, max(load.outstanding[i] for i in ids))
    return per_instance, most, moves


def test_prefixes_that_hash_unevenly_still_spread_the_load_and_keep_their_instance():
    # The same 11 / 5 prefixes at concurrency 4: the requests spread about evenly (the ring alone would
    # send 11/16 of them to one instance) and nearly every request of a prefix reaches the instance of its
    # previous one (its KV cache).
    r = route([1, 2], max_batch_size=8)
    per_instance, most, moves = closed_loop(r, skewed_prefixes(), requests=2000, concurrency=4, seed=3)
    assert most <= 4  # the floor: half the max batch size
    assert 0.42 <= per_instance[1] / 2000 <= 0.58, per_instance
    assert moves / 2000 <= 0.02, moves


def test_a_new_instance_takes_only_its_share_and_a_removed_one_gives_only_its_own():
    keys = [random.Random(n).getrandbits(64) for n in range(3000)]
    before = {k: prefix.pick([1, 2, 3], {}, k) for k in keys}
    grown = {k: prefix.pick([1, 2, 3, 4], {}, k) for k in keys}
    moved = [k for k in keys if before[k] != grown[k]]
    assert all(grown[k] == 4 for k in moved)  # keys only move to the new instance
    assert 0.15 < len(moved) / len(keys) < 0.35  # about a quarter
    prefix.forget()
    assert {k: prefix.pick([1, 2, 3], {}, k) for k in keys} == before
    shrunk = {k: prefix.pick([1, 3], {}, k) for k in keys}
    assert all(shrunk[k] == before[k] for k in keys if before[k] != 2)  # only instance 2's keys move


def test_least_outstanding_routing_and_keyless_requests_are_unchanged():
    for r, key in ((route([1, 2, 3], routing="least_outstanding"), 12345), (route([1, 2, 3]), None)):
        load.outstanding.update({1: 2, 2: 0, 3: 0})
        assert load.instance_pick(r, set(), key)[0] == 2  # fewest outstanding, ties by id
        assert load.instance_pick(r, {2}, key)[0] == 3
        assert load.instance_pick(r, {1, 2, 3}, key) is None


def test_excluded_instances_are_never_picked():
    r = route([1, 2, 3])
    for n in range(50):
        key = prefix.prefix_key("chat/completions", chat(system_prompt(n), "q"))
        home = load.instance_pick(r, set(), key)[0]
        assert load.instance_pick(r, {home}, key)[0] != home
