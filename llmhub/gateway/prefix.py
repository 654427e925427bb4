"""Prefix-aware instance selection: consistent hashing with bounded loads over a prompt's prefix.

Requests whose prompts share a prefix should reach the instance that already holds that prefix in its
KV cache (vLLM's automatic prefix caching), so that it is not computed again. As KubeAI's
``PrefixHash`` strategy (CHWBL, internal/loadbalancer/balance_chwbl.go) does on Kubernetes:

- the *prefix key* is a hash of the first `PREFIX_BLOCKS` whole blocks of the prompt's text (chat: the
  messages' roles and text in order, completions: the prompt), a block being `BLOCK_CHARS` characters:
  vLLM's 16-token KV block at about 4 characters per token. A prompt shorter than one block has no key;
- each instance owns `REPLICAS` points on a hash ring; a key goes to the owner of the first point at or
  after it, walking on while that instance is past its share of the load: it may take the request when
  ``outstanding + 1 ≤ max(ceil(LOAD_FACTOR × (total outstanding + 1) / instances), floor)`` (Mirrokni,
  Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018). The floor is half the
  deployment's max batch size (`FLOOR_OF_BATCH`): an engine running fewer requests than that has free
  batch slots, so nothing waits there, and sending the request elsewhere would only lose its cached
  prefix (at two or three requests in flight the plain bound would move every third one). The least
  loaded instance always fits, so the walk ends; least outstanding requests is the fallback all the same.

Adding or removing an instance moves only the keys of its own points. Nothing here re-serialises the
request body: the text is read from the parsed JSON.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left

BLOCK_CHARS = 64  # 16 tokens (vLLM's KV block) × ~4 characters per token
PREFIX_BLOCKS = 4  # blocks hashed: 256 characters, ~64 tokens
REPLICAS = 128  # ring points per instance
LOAD_FACTOR = 1.25  # an instance takes at most 1.25 × its even share of the outstanding requests
FLOOR_OF_BATCH = 0.5  # ... unless it has fewer outstanding than this share of the max batch size
_PREFIX_CHARS = BLOCK_CHARS * PREFIX_BLOCKS
_RINGS_MAX = 1024  # rings kept (one per distinct set of ready instances)

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


def bound(total: int, instances: int, floor: int = 0, factor: float = LOAD_FACTOR) -> int:
    """The most outstanding requests an instance may have after taking one more, when `total` are
    outstanding over `instances`: ``max(ceil(factor × (total + 1) / instances), floor)``."""
    return max(math.ceil(factor * (total + 1) / instances), floor)


def pick(instance_ids: list[int], loads: dict[int, int], key: int, *, floor: int = 0,
         factor: float = LOAD_FACTOR) -> int:  # fmt: skip
    """The instance (one of `instance_ids`, non-empty) for prefix `key` given outstanding `loads`
    ({instance id: requests}; missing = 0): the key's owner on the ring, or the next one within the bound
    (`bound`; `floor`: outstanding requests below which an instance is never past its share)."""
    ids = tuple(sorted(instance_ids))
    if len(ids) == 1:
        return ids[0]
    hashes, owners = ring(ids)
    total = sum(loads.get(i, 0) for i in ids)
    most = bound(total, len(ids), floor, factor)
    start = bisect_left(hashes, key)
    seen: set[int] = set()
    for n in range(len(hashes)):
        owner = owners[(start + n) % len(hashes)]
        if owner in seen:
            continue
        if loads.get(owner, 0) + 1 <= most:
            return owner
        seen.add(owner)
        if len(seen) == len(ids):
            break
    return min(ids, key=lambda i: (loads.get(i, 0), i))  # least outstanding (unreachable: the least loaded fits)
