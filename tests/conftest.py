import pytest

from tests.factories import GpuTypeFactory, HostFactory, UserFactory, token_for


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
