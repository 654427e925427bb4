"""The deploy API (DeepInfra's shape): validation, authentication, isolation."""

import json

import pytest

from llmhub.deployments.models import Deployment
from tests.factories import DeploymentFactory, GpuTypeFactory, token_for

pytestmark = pytest.mark.django_db

# The settings a deployment gets when the body gives only min and max instances (issue 10's new ones too).
SETTINGS_DEFAULTS = {"routing": "prefix", "response_cache_seconds": None, "request_logging": False,
                     "idle_alert_hours": 2.0, "idle_stop_hours": None}  # fmt: skip


def body(**overrides):
    data = {
        "model_name": "my-model",
        "gpu": "CPU",
        "num_gpus": 1,
        "max_batch_size": 8,
        "hf": {"repo": "llmhub/tiny-random-llama"},
        "settings": {"min_instances": 1, "max_instances": 1},
    }
    data.update(overrides)
    return data


def post(client, auth, data):
    raw = data if isinstance(data, str) else json.dumps(data)
    return client.post("/deploy/llm", raw, content_type="application/json", **auth)


def test_create_returns_the_deploy_object(client, auth, cpu_host, user):
    response = post(client, auth, body(hf={"repo": "llmhub/tiny-random-llama", "token": "hf_secret_value"}))

    assert response.status_code == 200, response.content
    data = response.json()
    assert data["model_name"] == "alice/my-model"
    assert data["status"] == "deploying"
    assert data["gpu"] == "CPU" and data["num_gpus"] == 1 and data["max_batch_size"] == 8
    assert data["settings"] == {"min_instances": 1, "max_instances": 1, "cooldown_seconds": 300, **SETTINGS_DEFAULTS}
    assert data["instances"] == {"running": 0, "pending": 0}
    assert "hf_secret_value" not in response.content.decode()
    deployment = Deployment.objects.get(deploy_id=data["deploy_id"])
    assert deployment.user == user
    assert "hf_secret_value" not in deployment.hf_token_encrypted  # encrypted at rest
    assert deployment.events.filter(kind="created").exists()


def test_get_and_list_show_the_deployment(client, auth, cpu_host):
    deploy_id = post(client, auth, body()).json()["deploy_id"]

    detail = client.get(f"/deploy/{deploy_id}", **auth)
    listing = client.get("/deploy/list", **auth)

    assert detail.status_code == 200
    assert detail.json()["deploy_id"] == deploy_id
    assert detail.json()["fail_reason"] is None
    assert [d["deploy_id"] for d in listing.json()] == [deploy_id]


def test_delete_marks_deleting(client, auth, cpu_host):
    deploy_id = post(client, auth, body()).json()["deploy_id"]

    response = client.delete(f"/deploy/{deploy_id}", **auth)

    assert response.status_code == 200
    assert response.json()["status"] == "deleting"
    assert Deployment.objects.get(deploy_id=deploy_id).status == Deployment.Status.DELETING


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"gpu": "H100-80GB"}, "gpu", "not offered"),
        ({"settings": {"min_instances": 3, "max_instances": 1}}, "settings.min_instances", "must not be more"),
        ({"num_gpus": 0}, "num_gpus", "greater than or equal to 1"),
        ({"num_gpus": 9}, "num_gpus", "less than or equal to 8"),
        ({"max_batch_size": 257}, "max_batch_size", "less than or equal to 256"),
        ({"model_name": "bad name!"}, "model_name", "letters, digits"),
        ({"model_name": "x" * 65}, "model_name", "at most 64"),
        ({"hf": {}}, "hf.repo", "required"),
        ({"hf": {"repo": "not a repo"}}, "hf.repo", "Hugging Face repo id"),
        ({"num_gpus": "two"}, "num_gpus", "whole number"),
    ],
)
def test_invalid_fields_are_400_with_a_field_message(client, auth, cpu_host, overrides, field, words):
    response = post(client, auth, body(**overrides))

    assert response.status_code == 400
    errors = response.json()["errors"]
    assert field in errors, errors
    assert words in " ".join(errors[field])
    assert not Deployment.objects.exists()


def test_missing_fields_are_named(client, auth, cpu_host):
    response = post(client, auth, {"model_name": "m"})

    assert response.status_code == 400
    assert {"gpu", "num_gpus", "max_batch_size", "hf.repo", "settings.min_instances"} <= set(response.json()["errors"])


def test_malformed_json_says_where(client, auth, cpu_host):
    # DeepInfra's own documentation example has a trailing comma in "settings".
    raw = '{"model_name": "m", "gpu": "CPU", "settings": {"min_instances": 1, "max_instances": 1,}}'

    response = post(client, auth, raw)

    assert response.status_code == 400
    assert "Malformed JSON at line 1 column" in response.json()["detail"]


def test_unknown_fields_are_rejected_by_name(client, auth, cpu_host):
    response = post(client, auth, body(colour="blue", settings={"min_instances": 1, "max_instances": 1, "x": 2}))

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"colour", "settings.x"}


def test_name_taken_is_a_field_error(client, auth, cpu_host):
    assert post(client, auth, body()).status_code == 200

    response = post(client, auth, body())

    assert response.status_code == 400
    assert "already have a deployment named" in response.json()["errors"]["model_name"][0]


def test_gpu_quota_counts_max_instances_times_gpus(client, auth, cpu_host):
    assert (
        post(client, auth, body(model_name="a", settings={"min_instances": 0, "max_instances": 3})).status_code == 200
    )

    response = post(client, auth, body(model_name="b", settings={"min_instances": 0, "max_instances": 2}))

    assert response.status_code == 400
    assert "only 1 of your quota of 4" in response.json()["errors"]["settings.max_instances"][0]


def test_a_deleted_name_can_be_reused(client, auth, cpu_host):
    deploy_id = post(client, auth, body()).json()["deploy_id"]
    Deployment.objects.filter(deploy_id=deploy_id).update(status=Deployment.Status.DELETED)

    assert post(client, auth, body()).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
def test_no_or_bad_token_is_401(client, cpu_host, header):
    extra = {"HTTP_AUTHORIZATION": header} if header else {}

    for response in (
        client.post("/deploy/llm", json.dumps(body()), content_type="application/json", **extra),
        client.get("/deploy/list", **extra),
        client.get("/deploy/whatever", **extra),
    ):
        assert response.status_code == 401
        assert "API token" in response.json()["detail"]


def test_revoked_token_is_401(client, user, cpu_host):
    from llmhub.accounts.models import ApiToken
    from llmhub.accounts.services import api_token_revoke

    secret = token_for(user)
    api_token_revoke(token=ApiToken.objects.get(user=user))

    assert client.get("/deploy/list", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 401


def test_another_users_deployment_is_404_everywhere(client, auth, other_user, cpu_host):
    theirs = DeploymentFactory(user=other_user, gpu_type=GpuTypeFactory(name="CPU"))

    assert client.get(f"/deploy/{theirs.deploy_id}", **auth).status_code == 404
    assert client.delete(f"/deploy/{theirs.deploy_id}", **auth).status_code == 404
    assert client.get("/deploy/list", **auth).json() == []
    theirs.refresh_from_db()
    assert theirs.status == Deployment.Status.DEPLOYING


def test_wrong_method_is_405(client, auth, cpu_host):
    assert client.get("/deploy/llm", **auth).status_code == 405
    assert client.post("/deploy/list", **auth).status_code == 405


def put(client, auth, deploy_id, data):
    raw = data if isinstance(data, str) else json.dumps(data)
    return client.put(f"/deploy/{deploy_id}", raw, content_type="application/json", **auth)


def test_put_changes_settings_and_records_an_event(client, auth, cpu_host):
    deploy_id = post(client, auth, body()).json()["deploy_id"]

    response = put(client, auth, deploy_id, {"settings": {"min_instances": 0, "max_instances": 3}})

    assert response.status_code == 200, response.content
    assert response.json()["settings"] == {"min_instances": 0, "max_instances": 3, "cooldown_seconds": 300,
                                          **SETTINGS_DEFAULTS}  # fmt: skip
    deployment = Deployment.objects.get(deploy_id=deploy_id)
    assert (deployment.min_instances, deployment.max_instances) == (0, 3)
    assert deployment.events.filter(kind="scaled", message__contains="1–1 → 0–3").exists()

    cooled = put(client, auth, deploy_id, {"settings": {"cooldown_seconds": 60}})
    assert cooled.json()["settings"] == {"min_instances": 0, "max_instances": 3, "cooldown_seconds": 60,
                                        **SETTINGS_DEFAULTS}  # fmt: skip


def test_put_of_a_fixed_field_says_which_fields_are_fixed(client, auth, cpu_host):
    deploy_id = post(client, auth, body()).json()["deploy_id"]

    response = put(client, auth, deploy_id, {"num_gpus": 2, "hf": {"repo": "x/y"}, "settings": {"max_instances": 2}})

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"num_gpus", "hf.repo"}
    assert "fixed" in response.json()["detail"]
    assert Deployment.objects.get(deploy_id=deploy_id).max_instances == 1


@pytest.mark.parametrize(
    ("new_settings", "field", "words"),
    [
        ({"min_instances": 2}, "settings.min_instances", "must not be more than max"),
        ({"max_instances": 5}, "settings.max_instances", "quota of 4"),
        ({"max_instances": 0}, "settings.max_instances", "greater than or equal to 1"),
    ],
)
def test_put_validates_settings(client, auth, cpu_host, new_settings, field, words):
    deploy_id = post(client, auth, body()).json()["deploy_id"]

    response = put(client, auth, deploy_id, {"settings": new_settings})

    assert response.status_code == 400
    assert words in " ".join(response.json()["errors"][field])


def test_put_to_another_users_deployment_is_404(client, auth, other_user, cpu_host):
    theirs = DeploymentFactory(user=other_user, gpu_type=GpuTypeFactory(name="CPU"))

    response = put(client, auth, theirs.deploy_id, {"settings": {"max_instances": 2}})

    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.max_instances == 1


def test_token_use_is_recorded_to_the_minute(client, user, cpu_host):
    from datetime import timedelta

    from llmhub.accounts.models import ApiToken

    secret = token_for(user)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    token = ApiToken.objects.get(user=user)
    assert token.last_used_at is None

    client.get("/deploy/list", **headers)
    token.refresh_from_db()
    first = token.last_used_at
    client.get("/deploy/list", **headers)
    token.refresh_from_db()
    assert token.last_used_at == first  # not rewritten within the minute

    ApiToken.objects.filter(id=token.id).update(last_used_at=first - timedelta(minutes=5))
    client.get("/deploy/list", **headers)
    token.refresh_from_db()
    assert token.last_used_at > first - timedelta(minutes=5)
