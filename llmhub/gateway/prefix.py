"""Prefix-aware instance selection: consistent hashing with bounded loads over a prompt's prefix.

Requests whose prompts share a prefix should reach the instance that already holds that prefix in its
KV cache (vLLM's automatic prefix caching), so that it is not computed again. As KubeAI's
``PrefixHash`` strategy (CHWBL, internal/loadbalancer/balance_chwbl.go) does on Kubernetes:

- the *prefix key* is a hash of the first `PREFIX_BLOCKS` whole blocks of the prompt's text (chat: the
  messages' roles and text in order, completions: the prompt), a block being `BLOCK_CHARS` characters:
  vLLM's 16-token KV block at about 4 characters per token. A prompt shorter than one block has no key;
- each instance owns `REPLICAS` points on a hash ring; a key goes to the owner of the first point at or
  after it, walking on while that instance is past its share of the load. An instance may take the
  request when ``outstanding + 1 ≤ ceil(LOAD_FACTOR × (total outstanding + 1) / instances)``: the
  capacity ⌈(1 + ε)·m/n⌉ of Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
  Loads" (SODA 2018), ε = 0.25 as KubeAI's default load factor. (KubeAI compares with the unrounded
  ``(total + 1) / n × 1.25``, which over two instances and a few requests is least outstanding
  requests; rounded up, a prefix's second request may join its first.) At concurrency 4 over two
  instances the bound is 3: all four never pile onto one engine, and one engine never runs more than
  two while the other is idle. An instance at or past the deployment's max batch size (`slots`) is
  also past its share while another has a free batch slot: its engine would queue the request.

One addition to CHWBL (measured in bench/prefix_routing.py, two vLLM CPU engines, 16 prefixes that
the ring split 10 / 6): a key sent past its instance's bound *stays* on the instance that took it
(`homes`), which has just put the prefix into its KV cache, until that one is past its own bound.
Memoryless CHWBL sends the key home again, so under a tight bound every prefix bounces between engines
and is cached on both; staying, a few keys move once and the prefixes even out over the instances
(the ring splits a handful of keys evenly only on average). `homes` is per gateway process and keeps
the `HOMES_MAX` most recently moved keys; a key whose home is gone goes back to the ring.

Adding or removing an instance moves only the keys of its own points (and those that had moved to
it). The least loaded instance always fits, so the walk ends. Nothing here re-serialises the request
body: the text is read from the parsed JSON.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left

BLOCK_CHARS = 64  # 16 tokens (vLLM's KV block) × ~4 characters per token
PREFIX_BLOCKS = 4  # blocks hashed: 256 characters, ~64 tokens
REPLICAS = 128  # ring points per instance
LOAD_FACTOR = 1.25  # an instance takes at most 1.25 × its even share of the outstanding requests (rounded up)
HOMES_MAX = 65536  # keys that moved off their ring owner, remembered per process
_PREFIX_CHARS = BLOCK_CHARS * PREFIX_BLOCKS
_RINGS_MAX = 1024  # rings kept (one per distinct set of ready instances)

homes: dict[int, int] = {}  # prefix key → instance it moved to past its owner's bound (oldest first)
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


def bound(total: int, instances: int, factor: float = LOAD_FACTOR) -> int:
    """The most outstanding requests an instance may have after taking one more, when `total` are
    outstanding over `instances`: ``ceil(factor × (total + 1) / instances)`` (Mirrokni et al. 2018)."""
    return math.ceil(factor * (total + 1) / instances)


def pick(instance_ids: list[int], loads: dict[int, int], key: int, *, slots: int = 0,
         factor: float = LOAD_FACTOR) -> int:  # fmt: skip
    """The instance (one of `instance_ids`, non-empty) for prefix `key` given outstanding `loads`
    ({instance id: requests}; missing = 0): the key's home (where it last moved, else its owner on the
    ring) if within the bound (`bound`), else the next instance on the ring within it, which becomes the
    key's home. `slots`: the deployment's max batch size (0: none); an instance with that many outstanding
    is past its share while another has fewer."""
    ids = tuple(sorted(instance_ids))
    if len(ids) == 1:
        return ids[0]
    hashes, owners = ring(ids)
    most = bound(sum(loads.get(i, 0) for i in ids), len(ids), factor)
    full = slots if slots and any(loads.get(i, 0) < slots for i in ids) else 0

    def fits(instance: int) -> bool:
        n = loads.get(instance, 0)
        return n + 1 <= most and not (full and n >= full)

    start = bisect_left(hashes, key)
    owner = owners[start % len(hashes)]
    home = homes.get(key)
    if home not in ids:
        home = owner
    if fits(home):
        return home
    chosen = None
    seen = {home}
    for n in range(len(hashes)):
        candidate = owners[(start + n) % len(hashes)]
        if candidate in seen:
            continue
        if fits(candidate):
            chosen = candidate
            break
        seen.add(candidate)
        if len(seen) == len(ids):
            break
    if chosen is None:  # unreachable (the least loaded instance fits); least outstanding all the same
        chosen = min(ids, key=lambda i: (loads.get(i, 0), i))
    _move(key, chosen, owner)
    return chosen


def _move(key: int, instance: int, owner: int) -> None:
    """`key` now lives on `instance`: remembered unless that is its ring `owner` (newest last)."""
    homes.pop(key, None)
    if instance != owner:
        if len(homes) >= HOMES_MAX:
            del homes[next(iter(homes))]
        homes[key] = instance
