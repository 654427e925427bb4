"""Gateway errors in OpenAI's shape: authentication, routing, bad bodies, no instance."""


import pytest

from llmhub.deployments.models import Deployment
from tests.factories import DeploymentFactory
from tests.gateway_support import assert_openai_error, chat

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Token abc"])
def test_missing_or_bad_token_is_401(client, user, header):
    headers = {"HTTP_AUTHORIZATION": header} if header else {}
    deployment = DeploymentFactory(user=user)

    assert_openai_error(chat(client, headers, model=deployment.full_name), 401, "invalid_api_key")
    assert_openai_error(client.get("/v1/openai/models", **headers), 401, "invalid_api_key")


def test_unknown_model_is_404(client, auth):
    assert_openai_error(chat(client, auth, model="alice/nothing"), 404, "model_not_found")


def test_another_users_model_is_404_like_an_unknown_one(client, auth, other_user):
    theirs = DeploymentFactory(user=other_user, model_name="secret", status=Deployment.Status.RUNNING)

    response = chat(client, auth, model=theirs.full_name)

    assert_openai_error(response, 404, "model_not_found")
    assert client.get("/v1/openai/models", **auth).json()["data"] == []


def test_models_lists_the_users_live_deployments(client, auth, user):
    DeploymentFactory(user=user, model_name="b", status=Deployment.Status.RUNNING)
    DeploymentFactory(user=user, model_name="a", status=Deployment.Status.DEPLOYING)
    DeploymentFactory(user=user, model_name="gone", status=Deployment.Status.DELETED)

    data = client.get("/v1/openai/models", **auth).json()

    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["alice/a", "alice/b"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [("{not json", "invalid_json"), ("[1, 2]", "invalid_json"), ('{"messages": []}', "missing_model")],
)
def test_bad_bodies_are_400(client, auth, raw, code):
    response = client.post("/v1/openai/completions", raw, content_type="application/json", **auth)

    assert_openai_error(response, 400, code)


def test_no_instance_ready_within_the_hold_timeout_is_503_with_retry_after(client, auth, user, settings):
    settings.GATEWAY_HOLD_TIMEOUT = 1.0
    deployment = DeploymentFactory(user=user, status=Deployment.Status.DEPLOYING)

    response = chat(client, auth, model=deployment.full_name)

    assert_openai_error(response, 503, "no_ready_instance")
    assert int(response["Retry-After"]) > 0


def test_a_failed_deployment_is_503_with_its_reason(client, auth, user):
    deployment = DeploymentFactory(user=user, status=Deployment.Status.FAILED, fail_reason="CUDA out of memory")

    response = chat(client, auth, model=deployment.full_name)

    assert_openai_error(response, 503, "deployment_failed")
    assert "CUDA out of memory" in response.json()["error"]["message"]


def test_rate_limit_per_token_is_429_with_retry_after(client, auth, user, settings):
    settings.GATEWAY_RATE_LIMIT_PER_MINUTE = 2
    deployment = DeploymentFactory(user=user, status=Deployment.Status.FAILED)  # answers at once

    codes = [chat(client, auth, model=deployment.full_name).status_code for _ in range(3)]
    limited = chat(client, auth, model=deployment.full_name)

    assert codes[:2] == [503, 503]
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert 1 <= int(limited["Retry-After"]) <= 60


def test_wrong_method_is_405(client, auth):
    assert client.get("/v1/openai/chat/completions", **auth).status_code == 405
