"""Dashboard views: works / someone else's deployment → 404 / wrong method → 405 / anonymous → login."""

import pytest

from llmhub.deployments.models import Deployment
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db


def form_data(**overrides):
    data = {
        "model_name": "web-model", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 8,
        "hf_repo": "llmhub/tiny-random-llama", "hf_revision": "", "hf_token": "hf_private",
        "min_instances": 1, "max_instances": 1,
    }  # fmt: skip
    data.update(overrides)
    return data


def test_anonymous_is_sent_to_login(client):
    for url in ("/deployments/", "/deployments/new", "/deployments/abc/", "/alice/model", "/alice/model/api"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_create_with_the_form(signed_in, cpu_host, user):
    response = signed_in.post("/deployments/new", form_data())

    deployment = Deployment.objects.get(user=user)
    assert response.status_code == 302 and response["Location"] == f"/deployments/{deployment.deploy_id}/"
    page = signed_in.get(response["Location"]).content.decode()
    assert "alice/web-model" in page and "deploying" in page
    assert "hf_private" not in page


def test_form_errors_are_shown_and_nothing_is_made(signed_in, cpu_host):
    response = signed_in.post("/deployments/new", form_data(gpu="A100-80GB", min_instances=2, max_instances=1))

    page = response.content.decode()
    assert response.status_code == 400
    assert "not offered by any host" in page and "must not be more than max instances" in page
    assert 'value="hf_private"' not in page  # the token is never rendered back
    assert not Deployment.objects.exists()


def test_list_shows_own_deployments_with_a_polling_badge(signed_in, user, other_user):
    DeploymentFactory(user=user, model_name="mine")
    DeploymentFactory(user=other_user, model_name="theirs")

    page = signed_in.get("/deployments/").content.decode()

    assert "alice/mine" in page and "theirs" not in page
    assert 'hx-trigger="every 2s"' in page


def test_status_badge_stops_polling_once_settled(signed_in, user):
    deployment = DeploymentFactory(user=user)
    assert signed_in.get(f"/deployments/{deployment.deploy_id}/status").status_code == 200

    Deployment.objects.filter(id=deployment.id).update(status=Deployment.Status.RUNNING)
    response = signed_in.get(f"/deployments/{deployment.deploy_id}/status")

    assert response.status_code == 286
    assert "running" in response.content.decode() and "hx-trigger" not in response.content.decode()


def test_trash_icon_deletes_in_place(signed_in, user):
    deployment = DeploymentFactory(user=user)

    response = signed_in.delete(f"/deployments/{deployment.deploy_id}/delete", HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    assert 'hx-swap-oob="true"' in response.content.decode()
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.DELETING


def test_someone_elses_deployment_is_404(signed_in, other_user):
    theirs = DeploymentFactory(user=other_user)
    base = f"/deployments/{theirs.deploy_id}"

    assert signed_in.get(f"{base}/").status_code == 404
    assert signed_in.get(f"{base}/status").status_code == 404
    assert signed_in.delete(f"{base}/delete").status_code == 404
    assert signed_in.post(f"{base}/chat", "{}", content_type="application/json").status_code == 404
    theirs.refresh_from_db()
    assert theirs.status == Deployment.Status.DEPLOYING


def test_wrong_method_is_405(signed_in, user):
    deployment = DeploymentFactory(user=user)

    assert signed_in.get(f"/deployments/{deployment.deploy_id}/delete").status_code == 405
    assert signed_in.get(f"/deployments/{deployment.deploy_id}/chat").status_code == 405


def test_scaling_form_changes_min_and_max_in_place(signed_in, user):
    deployment = DeploymentFactory(user=user)

    response = signed_in.post(
        f"/deployments/{deployment.deploy_id}/scale", {"min_instances": 0, "max_instances": 2}, HTTP_HX_REQUEST="true"
    )

    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="scale-form"' in page and "now runs 0–2 instances" in page
    assert "0–2 instances</p>" in page  # the summary line is swapped out of band
    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.max_instances) == (0, 2)


def test_scaling_form_errors_are_shown_and_change_nothing(signed_in, user):
    deployment = DeploymentFactory(user=user)
    url = f"/deployments/{deployment.deploy_id}/scale"

    over_quota = signed_in.post(url, {"min_instances": 1, "max_instances": 9}, HTTP_HX_REQUEST="true")
    inverted = signed_in.post(url, {"min_instances": 3, "max_instances": 2}, HTTP_HX_REQUEST="true")

    assert over_quota.status_code == 400 and "quota of 4" in over_quota.content.decode()
    assert inverted.status_code == 400 and "must not be more than max" in inverted.content.decode()
    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.max_instances) == (1, 1)


def test_scaling_someone_elses_deployment_is_404(signed_in, other_user, client):
    theirs = DeploymentFactory(user=other_user)

    assert (
        signed_in.post(f"/deployments/{theirs.deploy_id}/scale", {"min_instances": 0, "max_instances": 2}).status_code
        == 404
    )
    assert signed_in.get(f"/deployments/{theirs.deploy_id}/scale").status_code == 405
    theirs.refresh_from_db()
    assert theirs.max_instances == 1


def test_model_pages_show_the_chat_and_filled_in_examples(signed_in, user, settings):
    settings.PUBLIC_URL = "https://llm.example.org"
    DeploymentFactory(user=user, model_name="chatty")

    demo = signed_in.get("/alice/chatty")
    api = signed_in.get("/alice/chatty/api").content.decode()

    assert demo.status_code == 200 and 'id="chat-form"' in demo.content.decode()
    assert "https://llm.example.org/v1/openai/chat/completions" in api
    assert 'model="alice/chatty"' in api and 'base_url="https://llm.example.org/v1/openai"' in api
    assert "baseURL:" in api


def test_model_pages_of_others_and_unknown_models_are_404(signed_in, user, other_user):
    DeploymentFactory(user=other_user, model_name="hidden")

    assert signed_in.get("/bob/hidden").status_code == 404
    assert signed_in.get("/bob/hidden/api").status_code == 404
    assert signed_in.get("/alice/nothing").status_code == 404


def test_reserved_usernames_are_refused():
    from django.core.exceptions import ValidationError

    from llmhub.accounts.models import User

    with pytest.raises(ValidationError, match="reserved"):
        User(username="deploy", password="x").full_clean()


def test_create_form_shows_cost_at_min_and_max(signed_in, cpu_host):
    from decimal import Decimal

    cpu_host.gpu_type.hourly_price = Decimal("2.50")
    cpu_host.gpu_type.save()

    response = signed_in.post(
        "/deployments/new/estimate", {"gpu": "CPU", "num_gpus": 2, "min_instances": 1, "max_instances": 3}
    )

    page = response.content.decode()
    assert response.status_code == 200
    assert "$5.00" in page and "$3650.00" in page  # 1 × 2 GPUs × 2.50 USD/h; × 730 h
    assert "$15.00" in page and "$10950.00" in page  # at max: 3 instances
    empty = signed_in.post("/deployments/new/estimate", {"gpu": "CPU"}).content.decode()
    assert "Choose a GPU type" in empty
    inverted = {"gpu": "CPU", "num_gpus": 1, "min_instances": 3, "max_instances": 1}
    assert "Fix the fields marked in red" in signed_in.post("/deployments/new/estimate", inverted).content.decode()


def test_list_shows_the_hourly_cost_at_current_scale(signed_in, user, cpu_host):
    from decimal import Decimal

    from llmhub.fleet.models import Instance

    cpu_host.gpu_type.hourly_price = Decimal("1.25")
    cpu_host.gpu_type.save()
    deployment = DeploymentFactory(user=user, gpu_type=cpu_host.gpu_type, num_gpus=2, max_instances=2)
    Instance.objects.create(deployment=deployment, host=cpu_host, state=Instance.State.READY)
    Instance.objects.create(deployment=deployment, state=Instance.State.PENDING)  # pending costs nothing

    assert "$2.50/h" in signed_in.get("/deployments/").content.decode()


def test_instance_log_tail(signed_in, user, other_user, cpu_host, monkeypatch):
    from llmhub.fleet import engine
    from llmhub.fleet.models import Instance

    monkeypatch.setattr(engine, "container_logs", lambda url, name, tail: f"INFO engine {name} ready\n")
    mine = DeploymentFactory(user=user)
    instance = Instance.objects.create(deployment=mine, host=cpu_host, state="ready", container_id="abc")
    theirs = DeploymentFactory(user=other_user)
    their_instance = Instance.objects.create(deployment=theirs, host=cpu_host, state="ready", container_id="def")

    page = signed_in.get(f"/deployments/{mine.deploy_id}/instances/{instance.id}/logs").content.decode()

    assert f"INFO engine {instance.container_name} ready" in page
    assert signed_in.get(f"/deployments/{theirs.deploy_id}/instances/{their_instance.id}/logs").status_code == 404
    assert signed_in.get(f"/deployments/{mine.deploy_id}/instances/{their_instance.id}/logs").status_code == 404


def test_create_form_validates_filled_in_fields_as_the_user_types(signed_in, user, cpu_host):
    DeploymentFactory(user=user, model_name="taken", gpu_type=cpu_host.gpu_type)

    page = signed_in.post(
        "/deployments/new/estimate", {"model_name": "taken", "max_batch_size": "999", "hf_repo": ""}
    ).content.decode()

    assert 'id="errors-model_name" hx-swap-oob="true"' in page and "already have a deployment named" in page
    assert 'id="errors-max_batch_size" hx-swap-oob="true"' in page and "less than or equal to 256" in page
    assert 'id="errors-hf_repo"' not in page  # untouched fields are not shouted at


def test_deployment_page_plots_requests_tokens_and_latency(signed_in, user):
    from datetime import timedelta

    from django.utils import timezone

    from llmhub.gateway.models import UsageRecord
    from llmhub.gateway.selectors import usage_series

    deployment = DeploymentFactory(user=user)
    now = timezone.now().replace(second=30, microsecond=0)
    for latency in (100, 200, 300, 400):
        UsageRecord.objects.create(deployment=deployment, user=user, created_at=now, endpoint="chat/completions",
                                   status=200, prompt_tokens=10, completion_tokens=5, latency_ms=latency)  # fmt: skip
    UsageRecord.objects.create(deployment=deployment, user=user, created_at=now - timedelta(minutes=2),
                               endpoint="completions", status=200, latency_ms=50)  # fmt: skip

    series = usage_series(deployment.id, minutes=60, now=now)
    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()

    assert len(series["t"]) == 60
    assert series["requests"][-1] == 4 and series["requests"][-3] == 1 and sum(series["requests"]) == 5
    assert series["prompt_tokens"][-1] == 40 and series["completion_tokens"][-1] == 20
    assert series["p50"][-1] == 250 and series["p95"][-1] == pytest.approx(385)
    assert page.count('<svg class="chart"') == 3 and "Latency" in page
