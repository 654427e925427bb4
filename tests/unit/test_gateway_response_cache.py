"""Response cache keys: what makes a request cacheable and what keeps entries apart."""

import pytest

from llmhub.gateway.response_cache import cache_key
from llmhub.gateway.routing import Route

BODY = {"model": "alice/m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def route(**fields) -> Route:
    return Route(**{"deployment_id": 1, "user_id": 1, "full_name": "alice/m", "status": "running", "fail_reason": "",
                    "desired_instances": 1, "response_cache_seconds": 60, "serving_version": "v1", **fields})  # fmt: skip


def key(body=BODY, *, r=None, user_id=1, endpoint="chat/completions", stream=False):
    return cache_key(route=r or route(), user_id=user_id, endpoint=endpoint, body=body, stream=stream)


@pytest.mark.parametrize(
    "sampling, cacheable",
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"seed": 3, "temperature": 1.2}, True),
        ({"seed": 0}, True),
        ({}, False),  # the engine's default temperature samples
        ({"temperature": 0.5}, False),
        ({"temperature": False}, False),  # not a number
        ({"seed": True}, False),
        ({"seed": "3"}, False),
        ({"seed": None, "temperature": None}, False),
    ],
)
def test_only_deterministic_sampling_is_cacheable(sampling, cacheable):
    body = {"model": "alice/m", "messages": [{"role": "user", "content": "hi"}], **sampling}
    assert (key(body) is not None) is cacheable


def test_streams_and_deployments_without_a_cache_have_no_key():
    assert key(stream=True) is None
    assert key(r=route(response_cache_seconds=None)) is None
    assert key(r=route(response_cache_seconds=0)) is None


def test_keys_differ_by_deployment_owner_version_endpoint_body_and_adapter():
    base = key()
    others = [
        key(r=route(deployment_id=2)),
        key(user_id=2),
        key(r=route(serving_version="v2")),
        key(endpoint="completions"),
        key({**BODY, "max_tokens": 3}),
        key({**BODY, "model": "alice/m:sql"}),  # a LoRA adapter of the same deployment
    ]
    assert base is not None and base not in others and len(set(others)) == len(others)


def test_key_ignores_key_order_and_what_does_not_change_a_whole_answer():
    reordered = dict(reversed(list(BODY.items())))
    assert key(reordered) == key({**BODY, "stream": False}) == key({**BODY, "stream_options": {}}) == key()
