"""Revocation at once: a token or user changed from any path (the Django admin as an operator uses it, the
ORM from a shell, the dashboard) is refused by the running gateway processes within 1 s, and a request
held for a cold deployment re-checks its caller when it is released."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.utils import timezone

from llmhub.accounts.models import ApiToken, User
from llmhub.accounts.services import api_token_create, api_token_revoke
from tests.attacker import AdminSession
from tests.factories import DeploymentFactory, InstanceFactory, UserFactory
from tests.fakes.http import Handler, chat_completion, serve
from tests.stack import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def status_of(url, secret):
    """What the gateway says to `secret`: 404 (authenticated; the model does not exist) or 401."""
    return httpx.post(f"{url}/v1/openai/chat/completions", json={"model": "x/none", "messages": []},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=5).status_code  # fmt: skip


def refused_everywhere_within_a_second(web, secret):
    wait_for(lambda: all(status_of(url, secret) == 401 for url in web.urls), timeout=1.0, interval=0.05,
             what="every gateway process to refuse the token")  # fmt: skip


@pytest.fixture
def victim_token(db):
    user = UserFactory(username="leaver")
    token, secret = api_token_create(user=user, name="laptop")
    return user, token, secret


@pytest.fixture
def operator(fresh_web):
    """An operator signed in to the admin of processes of the test's own: the admin's log rows name content
    types, whose ids a shared process would keep cached across the flushes between tests."""
    UserFactory(username="operator", is_staff=True, is_superuser=True)
    return AdminSession(fresh_web.urls[0], "operator", "pw-for-tests")


def warm(web, secret):
    assert [status_of(url, secret) for url in web.urls] == [404, 404]  # each process has the caller cached


def test_revoking_a_token_in_the_admin_is_refused_at_once(fresh_web, operator, victim_token):
    web = fresh_web
    user, token, secret = victim_token
    warm(web, secret)
    now = timezone.now()

    operator.change(f"/admin/accounts/apitoken/{token.id}/change/",
                    {"revoked_at_0": now.strftime("%Y-%m-%d"), "revoked_at_1": now.strftime("%H:%M:%S")})  # fmt: skip

    assert ApiToken.objects.get(id=token.id).revoked_at is not None
    refused_everywhere_within_a_second(web, secret)


def test_deactivating_a_user_in_the_admin_is_refused_at_once(fresh_web, operator, victim_token):
    web = fresh_web
    user, token, secret = victim_token
    warm(web, secret)

    operator.change(f"/admin/accounts/user/{user.id}/change/", {"is_active": None})

    assert not User.objects.get(id=user.id).is_active
    refused_everywhere_within_a_second(web, secret)


@pytest.mark.parametrize("what", ["apitoken", "user"])
def test_deleting_in_the_admin_is_refused_at_once(fresh_web, operator, victim_token, what):
    web = fresh_web
    user, token, secret = victim_token
    warm(web, secret)

    operator.delete(f"/admin/accounts/{what}/{token.id if what == 'apitoken' else user.id}/delete/")

    assert not ApiToken.objects.filter(id=token.id).exists()
    refused_everywhere_within_a_second(web, secret)


@pytest.mark.parametrize("path", ["token update()", "user update()", "user save()", "token delete()", "dashboard"])
def test_changes_from_a_shell_or_the_dashboard_are_refused_at_once(web, victim_token, path):
    user, token, secret = victim_token
    warm(web, secret)

    if path == "token update()":
        ApiToken.objects.filter(user=user).update(revoked_at=timezone.now())
    elif path == "user update()":
        User.objects.filter(id=user.id).update(is_active=False)
    elif path == "user save()":
        user.is_active = False
        user.save()
    elif path == "token delete()":
        token.delete()
    else:
        api_token_revoke(token=token)

    refused_everywhere_within_a_second(web, secret)


class Engine(Handler):
    """Answers every chat completion (stream or not)."""

    def do_POST(self):  # noqa: N802
        body = self.read_json()
        self.server.hits += 1
        if body.get("stream"):
            raw = b'data: {"choices": [{"index": 0, "delta": {"content": "secret answer"}}]}\n\ndata: [DONE]\n\n'
            self.reply(200, raw, content_type="text/event-stream")
        else:
            self.reply(200, chat_completion(body["model"], "secret answer", prompt_tokens=1, completion_tokens=2))


@pytest.mark.parametrize("stream", [False, True])
def test_a_held_request_whose_token_is_revoked_meanwhile_gets_401_not_the_completion(web, victim_token, stream):
    user, token, secret = victim_token
    deployment = DeploymentFactory(user=user, model_name="cold", status="running", min_instances=0,
                                   target_instances=0)  # fmt: skip
    engine = serve(Engine, hits=0)

    def ask():
        with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{web.urls[0]}/v1/openai/chat/completions", headers={"Authorization": f"Bearer {secret}"},
            json={"model": deployment.full_name, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        ) as response:  # fmt: skip
            return response.status_code, response.read().decode()

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(ask)
        wait_for(lambda: deployment.__class__.objects.get(id=deployment.id).target_instances == 1, timeout=10,
                 interval=0.1, what="the held request to wake the deployment")  # fmt: skip
        api_token_revoke(token=token)
        InstanceFactory(deployment=deployment, ready=True,
                                port=engine.server_address[1])  # fmt: skip
        status, text = held.result(timeout=30)
    engine.shutdown()

    assert "secret answer" not in text
    assert engine.hits == 0
    if stream:  # the 200 and keepalives went out while it was held: the refusal is the stream's error event
        assert status == 200 and '"code": "invalid_api_key"' in text, text
    else:
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", text
