"""API tokens page: works / someone else's token → 404 / wrong method → 405 / anonymous → login."""

import re

import pytest
from django.utils import timezone

from llmhub.accounts.models import ApiToken
from llmhub.accounts.services import api_token_authenticate, api_token_create

pytestmark = pytest.mark.django_db


def shown_secret(page: str) -> str:
    match = re.search(r'<code id="new-token-secret"[^>]*>(lh-[A-Za-z0-9_-]+)</code>', page)
    assert match, "the new secret is not on the page"
    return match.group(1)


def test_anonymous_is_sent_to_login(client, user):
    token, _ = api_token_create(user=user, name="ci")
    for method, url in (("get", "/tokens/"), ("post", "/tokens/"), ("delete", f"/tokens/{token.id}/revoke")):
        response = getattr(client, method)(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    token.refresh_from_db()
    assert token.revoked_at is None


def test_create_shows_the_secret_once_and_it_authenticates(signed_in, user):
    response = signed_in.post("/tokens/", {"name": "laptop"})

    page = response.content.decode()
    assert response.status_code == 200
    assert "will not be shown again" in page
    assert "no-store" in response["Cache-Control"]
    assert "history.replaceState" in page  # a reload must not POST again and make a second token
    secret = shown_secret(page)
    assert api_token_authenticate(secret) == user
    token = ApiToken.objects.get(user=user)
    assert token.name == "laptop" and secret.startswith(token.prefix) and secret not in token.key_hash

    again = signed_in.get("/tokens/").content.decode()
    assert secret not in again and "new-token-secret" not in again
    assert "laptop" in again and f"{token.prefix}…" in again


def test_list_shows_only_live_tokens_of_the_user(signed_in, user, other_user):
    mine, _ = api_token_create(user=user, name="mine")
    used, _ = api_token_create(user=user, name="used-one")
    ApiToken.objects.filter(id=used.id).update(last_used_at=timezone.now())
    gone, _ = api_token_create(user=user, name="gone")
    ApiToken.objects.filter(id=gone.id).update(revoked_at=timezone.now())
    api_token_create(user=other_user, name="theirs")

    page = signed_in.get("/tokens/").content.decode()

    assert "mine" in page and "used-one" in page
    assert "gone" not in page and "theirs" not in page
    assert "never" in page and f"/tokens/{mine.id}/revoke" in page


def test_empty_name_is_a_form_error_and_no_token_is_made(signed_in):
    response = signed_in.post("/tokens/", {"name": "  "})

    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert "new-token-secret" not in response.content.decode()
    assert not ApiToken.objects.exists()


def test_too_long_name_is_a_form_error(signed_in):
    response = signed_in.post("/tokens/", {"name": "x" * 101})

    assert response.status_code == 400
    assert "at most 100 characters" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_trash_icon_revokes_in_place(signed_in, user):
    token, secret = api_token_create(user=user, name="ci")
    page = signed_in.get("/tokens/").content.decode()
    assert f'hx-delete="/tokens/{token.id}/revoke"' in page and 'hx-target="closest tr"' in page

    response = signed_in.delete(f"/tokens/{token.id}/revoke", HTTP_HX_REQUEST="true")

    body = response.content.decode()
    assert response.status_code == 200
    assert 'hx-swap-oob="true"' in body and "Revoked “ci”" in body
    assert "<tr" not in body  # the row is swapped for nothing
    assert api_token_authenticate(secret) is None
    assert "ci" not in signed_in.get("/tokens/").content.decode().split("<tbody>")[1].split("</tbody>")[0]


def test_revoke_with_a_plain_post_redirects_to_the_list(signed_in, user):
    token, secret = api_token_create(user=user, name="ci")

    response = signed_in.post(f"/tokens/{token.id}/revoke")

    assert response.status_code == 302 and response["Location"] == "/tokens/"
    assert api_token_authenticate(secret) is None
    assert "Revoked “ci”" in signed_in.get("/tokens/").content.decode()


def test_someone_elses_token_is_404_and_stays_live(signed_in, other_user):
    theirs, secret = api_token_create(user=other_user, name="theirs")

    assert signed_in.delete(f"/tokens/{theirs.id}/revoke", HTTP_HX_REQUEST="true").status_code == 404
    assert signed_in.post(f"/tokens/{theirs.id}/revoke").status_code == 404
    assert api_token_authenticate(secret) == other_user


def test_revoked_or_missing_token_is_404(signed_in, user):
    token, _ = api_token_create(user=user, name="ci")
    assert signed_in.delete(f"/tokens/{token.id}/revoke").status_code == 302

    assert signed_in.delete(f"/tokens/{token.id}/revoke").status_code == 404
    assert signed_in.delete("/tokens/999999/revoke").status_code == 404


def test_wrong_method_is_405(signed_in, user):
    token, secret = api_token_create(user=user, name="ci")

    assert signed_in.get(f"/tokens/{token.id}/revoke").status_code == 405
    assert signed_in.put("/tokens/").status_code == 405
    assert api_token_authenticate(secret) == user
