"""Sign-in throttling on /login/ and /admin/login/ as a password guesser meets it: about 10 failures per
account then a cool-off (even the right password is refused meanwhile), 100 failures per client address
across accounts, a page that says when to retry (HTTP 429), X-Forwarded-For not trusted by Django."""

from datetime import UTC, datetime, timedelta

import pytest

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

OFFICE = "203.0.113.7"
T0 = datetime(2026, 3, 2, 9, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    """A cheap password hasher: these tests sign in hundreds of times (PBKDF2 would take minutes)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def clock_start():
    """`clock` (tests/conftest.py) stops time at T0."""
    return T0


@pytest.fixture
def alice(db):
    return UserFactory(username="alice", password="alice-password-1", is_staff=True, is_superuser=True)


def sign_in(client, username, password, *, path="/login/", address=OFFICE, **headers):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address, **headers)


def fail(client, username, times, **kwargs):
    return [sign_in(client, username, "wrong-password", **kwargs).status_code for _ in range(times)]


def test_the_eleventh_failure_for_one_account_meets_the_cool_off(client, alice, clock):
    # Nine times the form again ("Please enter a correct username..."); the tenth failure starts the cool-off.
    assert fail(client, "alice", 10) == [200] * 9 + [429]

    response = sign_in(client, "alice", "wrong-password")

    assert response.status_code == 429
    page = response.content.decode()
    assert "Too many failed sign-ins" in page and "Try again in 15 minutes" in page and "09:15 UTC" in page
    assert '<form method="post"' in page  # the sign-in page itself, not a bare error page
    assert int(response["Retry-After"]) == 15 * 60


def test_the_right_password_is_refused_during_the_cool_off_and_accepted_after(client, alice, clock):
    fail(client, "alice", 10)

    assert sign_in(client, "alice", "alice-password-1").status_code == 429
    assert "_auth_user_id" not in client.session

    clock.shift(timedelta(minutes=16))
    response = sign_in(client, "alice", "alice-password-1")
    assert response.status_code == 302 and "_auth_user_id" in client.session


def test_another_account_from_the_same_address_still_signs_in(client, alice, clock):
    UserFactory(username="bob", password="bob-password-1")
    fail(client, "alice", 12)

    assert sign_in(client, "bob", "bob-password-1").status_code == 302


def test_the_account_is_locked_from_every_address(client, alice, clock):
    for i in range(10):
        sign_in(client, "alice", "wrong-password", address=f"198.51.100.{i}")

    assert sign_in(client, "alice", "alice-password-1", address="192.0.2.99").status_code == 429


def test_a_hundred_failures_across_accounts_lock_the_address(client, alice, clock):
    UserFactory(username="carol", password="carol-password-1")
    for i in range(100):
        sign_in(client, f"guess-{i}", "wrong-password")

    assert sign_in(client, "carol", "carol-password-1").status_code == 429
    assert sign_in(client, "carol", "carol-password-1", address="192.0.2.1").status_code == 302  # elsewhere: fine


def test_a_forged_forwarded_for_header_does_not_give_a_fresh_address(client, alice, clock):
    UserFactory(username="carol", password="carol-password-1")
    for i in range(100):
        sign_in(client, f"guess-{i}", "wrong-password", HTTP_X_FORWARDED_FOR=f"10.9.{i // 250}.{i % 250}")

    response = sign_in(client, "carol", "carol-password-1", HTTP_X_FORWARDED_FOR="10.99.0.1")
    assert response.status_code == 429


def test_the_admin_sign_in_is_throttled_too(client, alice, clock):
    fail(client, "alice", 10, path="/admin/login/")

    response = sign_in(client, "alice", "alice-password-1", path="/admin/login/")

    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    assert sign_in(client, "alice", "alice-password-1").status_code == 429  # one count for both pages
