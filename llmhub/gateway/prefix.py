"""Prefix-aware instance selection: consistent hashing with bounded loads over a prompt's prefix.

Requests whose prompts share a prefix should reach the instance that already holds that prefix in its
KV cache (vLLM's automatic prefix caching), so that it is not computed again. As KubeAI's
``PrefixHash`` strategy (CHWBL, internal/loadbalancer/balance_chwbl.go) does on Kubernetes:

- the *prefix key* is a hash of the first `PREFIX_BLOCKS` whole blocks of the prompt's text (chat: the
  messages' roles and text in order, completions: the prompt), a block being `BLOCK_CHARS` characters:
  vLLM's 16-token KV block at about 4 characters per token. A prompt shorter than one block has no key;
- each instance owns `REPLICAS` points on a hash ring; a key's *walk* is the instances in the order of
  the first of their points at or after it (its owner first);
- a request goes to the first instance on its key's walk within the load bound: it may take the request
  when ``outstanding + 1 ≤ max(ceil(LOAD_FACTOR × (total outstanding + 1) / instances), floor)``: the
  capacity ⌈(1 + ε)·m/n⌉ of Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
  Loads" (SODA 2018), ε = 0.25 as KubeAI's default load factor. The floor is half the deployment's max
  batch size (`FLOOR_OF_BATCH`): an engine running fewer has free batch slots, nothing waits there, and
  sending the request elsewhere only loses its cached prefix (at concurrency 4 over two instances the
  plain bound is 3, and in bench/prefix_routing.py moving every 4th request that way cost a third of the
  hits and made TTFT worse). An instance at the max batch size is past its share while another has a
  free slot (its engine would queue the request).

Where this departs from KubeAI: the key's first instance is not always its ring owner but its *home*
(`homes`), and prefixes, not only requests, are balanced with bounded loads. A key seen for the first
time lives on the first instance of its walk that holds fewer than ``ceil(KEY_FACTOR × (prefixes + 1) /
instances)`` of the prefixes seen in the last `HOME_SECONDS`, and stays there while within that share;
an overflow past the load bound does not move it. The reason, measured: with a handful of prefixes the
ring splits them evenly only on average (16 prefixes went 10 / 6 over two instances), so one engine got
65 % of the requests and held more prefixes than its KV cache; balancing the prefixes evens out both the
load and the cache pressure, and since a prefix keeps its instance, nothing is evicted to make room for
strays. Adding an instance moves only the prefixes past the others' new share, all to it; removing one
moves only its own (to their ring order among those left). `homes` is per gateway process (each
process balances the prefixes it sees) and keeps at most `HOMES_MAX`.

Nothing here re-serialises the request body: the text is read from the parsed JSON.
"""

from __future__ import annotations

import hashlib
import math
import time
from bisect import bisect_left
from collections import defaultdict

BLOCK_CHARS = 64  # 16 tokens (vLLM's KV block) × ~4 characters per token
PREFIX_BLOCKS = 4  # blocks hashed: 256 characters, ~64 tokens
REPLICAS = 128  # ring points per instance
LOAD_FACTOR = 1.25  # an instance takes at most 1.25 × its even share of the outstanding requests (rounded up)
FLOOR_OF_BATCH = 0.5  # an instance with fewer outstanding than this share of its max batch size has room
KEY_FACTOR = 1.0  # an instance holds at most its even share (rounded up) of the recently seen prefixes
HOME_SECONDS = 300.0  # a prefix not seen this long is forgotten (its KV blocks are likely evicted)
HOMES_MAX = 65536  # prefixes remembered per process
_PREFIX_CHARS = BLOCK_CHARS * PREFIX_BLOCKS
_RINGS_MAX = 1024  # rings kept (one per distinct set of ready instances)

homes: dict[int, tuple[int, float]] = {}  # prefix key → (instance, monotonic seconds last seen), oldest first
_held: defaultdict[int, int] = defaultdict(int)  # instance → prefixes in `homes` living there
_rings: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prompt_prefix(endpoint: str, body: dict) -> str:
    """The first `PREFIX_BLOCKS` × `BLOCK_CHARS` characters of the prompt's text, or less when shorter.

    chat/completions (OpenAI Chat Completions API): each message as ``role`` + NUL + its text (a string,
    or the ``text`` of its content parts) + NUL, in order; completions: the ``prompt`` (a string, or the
    first of a list of strings). Anything else (token-id prompts, odd shapes): "".
    """
    parts: list[str] = []
    size = 0
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt[:_PREFIX_CHARS] if isinstance(prompt, str) else ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in messages:
        if size >= _PREFIX_CHARS or not isinstance(message, dict):
            break
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        if not isinstance(content, str):
            content = ""
        piece = f"{message.get('role')}\0{content}\0"
        parts.append(piece)
        size += len(piece)
    return "".join(parts)[:_PREFIX_CHARS]


def prefix_key(endpoint: str, body: dict) -> int | None:
    """A 64-bit hash of the prompt's first whole blocks (at most `PREFIX_BLOCKS`), or None when the prompt
    is shorter than one block (nothing worth keeping together)."""
    text = prompt_prefix(endpoint, body)
    whole = len(text) // BLOCK_CHARS * BLOCK_CHARS
    if not whole:
        return None
    return _hash64(text[:whole].encode("utf-8", "surrogatepass"))


def ring(instance_ids: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """The hash ring of `instance_ids`: (sorted point hashes, the instance id owning each point). An
    instance's points depend only on its id, so rings of overlapping sets agree on the common points."""
    cached = _rings.get(instance_ids)
    if cached is None:
        points = sorted((_hash64(f"{i}:{r}".encode()), i) for i in instance_ids for r in range(REPLICAS))
        cached = ([p for p, _ in points], [i for _, i in points])
        if len(_rings) >= _RINGS_MAX:
            _rings.clear()
        _rings[instance_ids] = cached
    return cached


def bound(total: int, instances: int, factor: float = LOAD_FACTOR, floor: int = 0) -> int:
    """The most outstanding requests an instance may have after taking one more, when `total` are
    outstanding over `instances`: ``max(ceil(factor × (total + 1) / instances), floor)`` (Mirrokni et al. 2018)."""
    return max(math.ceil(factor * (total + 1) / instances), floor)


def pick(instance_ids: list[int], loads: dict[int, int], key: int, *, slots: int = 0, floor: int = 0,
         factor: float = LOAD_FACTOR, now: float | None = None) -> int:  # fmt: skip
    """The instance (one of `instance_ids`, non-empty) for prefix `key` given outstanding `loads`
    ({instance id: requests}; missing = 0).

    The key's home: where it lives already, while that instance holds no more than its share of the
    recently seen prefixes (``ceil(KEY_FACTOR × prefixes / instances)``); else the first instance on the
    key's ring walk within that share, which becomes its home. The request goes home while within the load
    bound (`bound`; `floor`: outstanding requests below which an instance is never past its share; `slots`:
    the deployment's max batch size, 0 none: an instance with that many outstanding is past its share while
    another has fewer), else to the next instance on the ring within it; the key stays home. `now`:
    monotonic seconds (tests)."""
    ids = tuple(sorted(instance_ids))
    if len(ids) == 1:
        return ids[0]
    now = time.monotonic() if now is None else now
    _expire(now)
    order = walk(ids, key)
    entry = homes.pop(key, None)
    if entry is not None:
        _held[entry[0]] -= 1
    held = {i: _held[i] for i in ids}  # prefixes living on each instance, this one aside
    most_keys = math.ceil(KEY_FACTOR * (sum(held.values()) + 1) / len(ids))
    home = entry[0] if entry is not None and entry[0] in held else None
    if home is None or held[home] + 1 > most_keys:
        home = next(i for i in order if held[i] + 1 <= most_keys)  # the instance holding fewest always fits
    _held[home] += 1
    homes[key] = (home, now)  # newest last

    most = bound(sum(loads.get(i, 0) for i in ids), len(ids), factor, floor)
    full = slots if slots and any(loads.get(i, 0) < slots for i in ids) else 0
    for instance in (home, *(i for i in order if i != home)):
        n = loads.get(instance, 0)
        if n + 1 <= most and not (full and n >= full):
            return instance
    return min(ids, key=lambda i: (loads.get(i, 0), i))  # unreachable: the least loaded instance fits


def walk(ids: tuple[int, ...], key: int) -> list[int]:
    """`ids` in the order of `key`'s walk on their ring: its owner first."""
    ids = tuple(sorted(ids))
    hashes, owners = ring(ids)
    start = bisect_left(hashes, key)
    order: dict[int, None] = {}
    for n in range(len(hashes)):
        order.setdefault(owners[(start + n) % len(hashes)])
        if len(order) == len(ids):
            break
    return list(order)


def _expire(now: float) -> None:
    """Forget the prefixes not seen for `HOME_SECONDS`, and the oldest to leave room for one under `HOMES_MAX`."""
    while homes:
        key, (instance, seen) = next(iter(homes.items()))
        if seen > now - HOME_SECONDS and len(homes) < HOMES_MAX:
            return
        del homes[key]
        _held[instance] -= 1


def forget() -> None:
    """Forget every prefix's home (tests)."""
    homes.clear()
    _held.clear()
