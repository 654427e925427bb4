"""Fixtures of the unit tier (the shared ones, `fake`, `clock`, `user`... are in tests/conftest.py)."""

import pytest

from llmhub.billing import limits


@pytest.fixture
def signed_in(client, user):
    """Django's test client signed in as `user`."""
    client.force_login(user)
    return client


@pytest.fixture
def account(user):
    """`user`'s billing account."""
    return limits.billing_account_get(user=user)
