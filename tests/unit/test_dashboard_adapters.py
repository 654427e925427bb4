"""The deployment page's LoRA adapters form and the API tab's examples for adapters, embeddings and
fill-in-the-middle: the deploy API's rules, in place with htmx, owner only."""

import pytest

from llmhub.deployments.models import DeploymentEvent
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def reconciles(monkeypatch):
    """The deployments asked to reconcile (no broker in unit tests)."""
    asked = []
    monkeypatch.setattr("llmhub.deployments.services.reconcile_soon", asked.append)
    return asked


def post_adapters(client, deployment, text):
    return client.post(
        f"/deployments/{deployment.deploy_id}/adapters", {"lora_adapters": text}, HTTP_HX_REQUEST="true"
    )


def test_adapters_are_listed_and_changed_in_place(signed_in, user, reconciles):
    deployment = DeploymentFactory(user=user, model_name="coder")
    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    assert 'id="adapters-form"' in page and "No adapters" in page

    # A pinned revision cannot be served (vLLM loads an adapter by repo id): refused, nothing changed.
    pinned = post_adapters(signed_in, deployment, "sql llmhub/tiny-random-llama-lora\nchat acme/chat-lora v2\n")
    assert pinned.status_code == 400 and "&#x27;v2&#x27; cannot be pinned" in pinned.content.decode()
    deployment.refresh_from_db()
    assert deployment.lora_adapters == [] and reconciles == []

    response = post_adapters(signed_in, deployment, "sql llmhub/tiny-random-llama-lora\nchat acme/chat-lora main\n")

    assert response.status_code == 200
    html = response.content.decode()
    assert "alice/coder:sql" in html and "alice/coder:chat" in html and "acme/chat-lora @ main" in html
    deployment.refresh_from_db()
    assert deployment.lora_adapters == [
        {"name": "sql", "repo": "llmhub/tiny-random-llama-lora", "revision": ""},
        {"name": "chat", "repo": "acme/chat-lora", "revision": "main"},
    ]
    assert DeploymentEvent.objects.filter(deployment=deployment, kind="adapters").count() == 1
    assert reconciles == [deployment.id]

    assert post_adapters(signed_in, deployment, "").status_code == 200  # remove them all
    deployment.refresh_from_db()
    assert deployment.lora_adapters == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Bad_Name acme/lora", "Adapter 1 (name)"),
        ("sql acme/lora\nsql acme/other", "is used twice"),
        ("sql", "Line 1: give"),
        ("sql bad//repo", "Adapter 1"),
        ("\n".join(f"a{i} acme/lora" for i in range(9)), "8"),
    ],
)
def test_bad_adapters_are_field_errors_and_change_nothing(signed_in, user, reconciles, text, message):
    deployment = DeploymentFactory(user=user, lora_adapters=[{"name": "kept", "repo": "acme/kept", "revision": ""}])

    response = post_adapters(signed_in, deployment, text)

    assert response.status_code == 400 and message in response.content.decode()
    deployment.refresh_from_db()
    assert [a.name for a in deployment.adapters] == ["kept"] and reconciles == []


def test_an_embedding_model_takes_no_adapters(signed_in, user, reconciles):
    deployment = DeploymentFactory(user=user, task="embed")

    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    response = post_adapters(signed_in, deployment, "sql acme/lora")

    assert 'id="adapters-form"' not in page
    assert response.status_code == 400 and "cannot serve LoRA adapters" in response.content.decode()
    deployment.refresh_from_db()
    assert deployment.lora_adapters == []


def test_someone_elses_adapters_are_404(signed_in, other_user, reconciles):
    theirs = DeploymentFactory(user=other_user)

    assert post_adapters(signed_in, theirs, "sql acme/lora").status_code == 404
    assert signed_in.get(f"/deployments/{theirs.deploy_id}/adapters").status_code == 405
    theirs.refresh_from_db()
    assert theirs.lora_adapters == [] and reconciles == []


def test_api_tab_shows_adapters_fill_in_the_middle_and_embeddings(signed_in, user, settings):
    settings.PUBLIC_URL = "https://llm.example.org"
    DeploymentFactory(user=user, model_name="coder", lora_adapters=[{"name": "sql", "repo": "a/b", "revision": ""}])
    DeploymentFactory(user=user, model_name="embedder", task="embed")

    coder = signed_in.get("/alice/coder/api").content.decode()
    embedder = signed_in.get("/alice/embedder/api").content.decode()

    assert "alice/coder:sql" in coder and '"suffix":' in coder
    assert "https://llm.example.org/v1/openai/embeddings" in embedder
    assert 'client.embeddings.create(model="alice/embedder"' in embedder
    assert "chat/completions" not in embedder
