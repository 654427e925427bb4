from pathlib import Path

import pytest

from llmhub.fleet.services import gpu_type_ensure, host_register
from tests.factories import GpuTypeFactory, HostFactory, UserFactory, token_for
from tests.stack import DOCKER, engine_image, running_stack

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(autouse=True)
def fresh_gateway_state():
    """The gateway's per-process caches and counters start empty in every test."""
    from llmhub.gateway import load, routing

    routing.cache.clear()
    routing.cache.generation, routing.cache.checked_at = None, 0.0
    load.inflight.clear()
    load.outstanding.clear()
    load.usage_buffer.clear()


@pytest.fixture
def user(db):
    return UserFactory(username="alice")


@pytest.fixture
def other_user(db):
    return UserFactory(username="bob")


@pytest.fixture
def token(user):
    return token_for(user)


@pytest.fixture
def cpu_host(db):
    return HostFactory(name="local", gpu_type=GpuTypeFactory(name="CPU"), gpu_count=2)


@pytest.fixture
def auth(token):
    """Headers for Django's test client carrying `token` as a Bearer token."""
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture
def stack(transactional_db, tmp_path_factory):
    """The real platform (web, worker, beat) with the local Docker Engine as a 2-slot CPU host.

    Yields the web base URL. Tests using it must be `django_db(transaction=True)`: the platform's
    processes see only committed rows.
    """
    host_register(
        name="local", docker_url=DOCKER, address="127.0.0.1",
        gpu_type=gpu_type_ensure(name="CPU", uses_devices=False), gpu_count=2, engine_image=engine_image(),
    )  # fmt: skip
    with running_stack(tmp_path_factory.mktemp("stack-logs")) as url:
        yield url
