"""Serving options and settings on the deploy API and the dashboard (issue 10): task, engine options, LoRA
adapters, routing, response cache, request logging, idle guard; each rule a field error with a dotted path."""

import json

import pytest

from llmhub.deployments import services
from llmhub.deployments.models import Deployment, EngineOptions, LoraAdapter
from tests.factories import DeploymentFactory, GpuTypeFactory

pytestmark = pytest.mark.django_db

ENGINE = {"quantization": "awq", "dtype": "float16", "max_model_len": 4096, "prefix_caching": False,
          "kv_cache_dtype": "fp8", "speculative": {"method": "ngram", "num_speculative_tokens": 3}}  # fmt: skip
ADAPTERS = [{"name": "sql", "repo": "llmhub/tiny-random-llama-lora", "revision": "main"},
            {"name": "chat-2", "repo": "acme/chat-lora", "revision": None}]  # fmt: skip
SETTINGS = {"min_instances": 0, "max_instances": 2, "cooldown_seconds": 60, "routing": "least_outstanding",
            "response_cache_seconds": 600, "request_logging": True, "idle_alert_hours": 0.5,
            "idle_stop_hours": 12.0}  # fmt: skip


def body(**overrides):
    data = {
        "model_name": "my-model", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 8,
        "hf": {"repo": "llmhub/tiny-random-llama"}, "settings": {"min_instances": 1, "max_instances": 1},
    }  # fmt: skip
    data.update(overrides)
    return data


def post(client, auth, data):
    return client.post("/deploy/llm", json.dumps(data), content_type="application/json", **auth)


def put(client, auth, deploy_id, data):
    return client.put(f"/deploy/{deploy_id}", json.dumps(data), content_type="application/json", **auth)


def test_options_are_stored_and_echoed_in_create_get_and_list(client, auth, cpu_host):
    response = post(client, auth, body(engine=ENGINE, lora_adapters=ADAPTERS, settings=SETTINGS))

    assert response.status_code == 200, response.content
    deploy_id = response.json()["deploy_id"]
    deployment = Deployment.objects.get(deploy_id=deploy_id)
    assert deployment.task == "generate"
    assert deployment.engine == EngineOptions(**ENGINE)
    assert deployment.adapters == (LoraAdapter("sql", "llmhub/tiny-random-llama-lora", "main"),
                                   LoraAdapter("chat-2", "acme/chat-lora", ""))  # fmt: skip
    assert (deployment.routing, deployment.response_cache_seconds, deployment.request_logging) == (
        "least_outstanding", 600, True)  # fmt: skip
    assert (deployment.idle_alert_hours, deployment.idle_stop_hours) == (0.5, 12.0)
    echoed = {**ENGINE, "speculative": {"method": "ngram", "model": None, "num_speculative_tokens": 3}}
    for shown in (response.json(), client.get(f"/deploy/{deploy_id}", **auth).json(),
                  client.get("/deploy/list", **auth).json()[0]):  # fmt: skip
        assert shown["task"] == "generate"
        assert shown["engine"] == echoed
        assert shown["lora_adapters"] == ADAPTERS
        assert shown["settings"] == SETTINGS


def test_defaults_when_left_out(client, auth, cpu_host):
    data = post(client, auth, body()).json()

    assert data["task"] == "generate" and data["lora_adapters"] == []
    assert data["engine"] == {"quantization": None, "dtype": "auto", "max_model_len": None, "prefix_caching": True,
                              "kv_cache_dtype": "auto", "speculative": None}  # fmt: skip
    deployment = Deployment.objects.get(deploy_id=data["deploy_id"])
    assert deployment.engine_options == {} and deployment.engine == EngineOptions()
    assert (deployment.idle_alert_hours, deployment.request_logging, deployment.routing) == (2.0, False, "prefix")


def test_a_draft_model_and_an_embedding_task(client, auth, cpu_host):
    draft = post(client, auth, body(engine={"speculative": {"model": "acme/tiny-draft", "num_speculative_tokens": 4}}))
    embed = post(client, auth, body(model_name="embedder", task="embed"))

    assert draft.status_code == 200, draft.content
    assert Deployment.objects.get(deploy_id=draft.json()["deploy_id"]).engine.speculative == {
        "model": "acme/tiny-draft", "num_speculative_tokens": 4}  # fmt: skip
    assert embed.status_code == 200 and embed.json()["task"] == "embed"


SPEC = {"method": "ngram", "num_speculative_tokens": 2}


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"engine": {"quantization": "int4"}}, "engine.quantization", "'awq', 'gptq', 'fp8' or 'bitsandbytes'"),
        ({"engine": {"dtype": "float64"}}, "engine.dtype", "'bfloat16'"),
        ({"engine": {"max_model_len": 0}}, "engine.max_model_len", "greater than or equal to 1"),
        ({"engine": {"max_model_len": 1_048_577}}, "engine.max_model_len", "less than or equal to 1048576"),
        ({"engine": {"max_model_len": "4k"}}, "engine.max_model_len", "whole number"),
        ({"engine": {"max_model_len": 4096.5}}, "engine.max_model_len", "whole number"),
        ({"engine": {"prefix_caching": "yes"}}, "engine.prefix_caching", "true or false"),
        ({"engine": {"kv_cache_dtype": "fp16"}}, "engine.kv_cache_dtype", "'auto' or 'fp8'"),
        ({"engine": {"tensor_parallel": 2}}, "engine.tensor_parallel", "Unknown field"),
        ({"engine": {"speculative": {"method": "medusa", "num_speculative_tokens": 2}}}, "engine.speculative.method",
         "'ngram'"),
        ({"engine": {"speculative": {"method": "ngram", "num_speculative_tokens": 9}}},
         "engine.speculative.num_speculative_tokens", "less than or equal to 8"),
        ({"engine": {"speculative": {"method": "ngram", "num_speculative_tokens": 0}}},
         "engine.speculative.num_speculative_tokens", "greater than or equal to 1"),
        ({"engine": {"speculative": {"method": "ngram"}}}, "engine.speculative.num_speculative_tokens", "required"),
        ({"engine": {"speculative": {**SPEC, "model": "acme/draft"}}}, "engine.speculative", "not both"),
        ({"engine": {"speculative": {"num_speculative_tokens": 2}}}, "engine.speculative", "Give either"),
        ({"engine": {"speculative": {"model": "not a repo", "num_speculative_tokens": 2}}},
         "engine.speculative.model", "Hugging Face repo id"),
        ({"engine": None}, "engine", "object"),
        ({"task": "chat"}, "task", "'generate' or 'embed'"),
        ({"task": "embed", "lora_adapters": ADAPTERS[:1]}, "lora_adapters", "cannot serve LoRA adapters"),
        ({"task": "embed", "engine": {"speculative": SPEC}}, "engine.speculative", "cannot use speculative"),
        ({"lora_adapters": [{"name": f"a{i}", "repo": "acme/lora"} for i in range(9)]}, "lora_adapters",
         "at most 8"),
        ({"lora_adapters": [{"name": "SQL_v2", "repo": "acme/lora"}]}, "lora_adapters.0.name", "lowercase letters"),
        ({"lora_adapters": [{"name": "../etc", "repo": "acme/lora"}]}, "lora_adapters.0.name", "lowercase letters"),
        ({"lora_adapters": [{"name": "", "repo": "acme/lora"}]}, "lora_adapters.0.name", "blank"),
        ({"lora_adapters": [{"name": "a", "repo": "acme/../x"}]}, "lora_adapters.0.repo", "Hugging Face repo id"),
        ({"lora_adapters": [{"name": "a", "repo": "acme/l"}, {"name": "a", "repo": "acme/m"}]},
         "lora_adapters.1.name", "used twice"),
        ({"lora_adapters": [{"name": "a"}]}, "lora_adapters.0.repo", "required"),
        ({"lora_adapters": [{"name": "a", "repo": "acme/l", "scale": 2}]}, "lora_adapters.0.scale", "Unknown field"),
        ({"lora_adapters": {"name": "a"}}, "lora_adapters", "list"),
        ({"settings": {**SETTINGS, "routing": "random"}}, "settings.routing", "'prefix' or 'least_outstanding'"),
        ({"settings": {**SETTINGS, "response_cache_seconds": 0}}, "settings.response_cache_seconds",
         "greater than or equal to 1"),
        ({"settings": {**SETTINGS, "response_cache_seconds": 86401}}, "settings.response_cache_seconds",
         "less than or equal to 86400"),
        ({"settings": {**SETTINGS, "request_logging": "yes"}}, "settings.request_logging", "true or false"),
        ({"settings": {**SETTINGS, "idle_alert_hours": 0}}, "settings.idle_alert_hours", "greater than 0"),
        ({"settings": {**SETTINGS, "idle_stop_hours": -1}}, "settings.idle_stop_hours", "greater than 0"),
        ({"settings": {**SETTINGS, "idle_stop_hours": "soon"}}, "settings.idle_stop_hours", "number"),
    ],
)  # fmt: skip
def test_each_rule_is_a_field_error(client, auth, cpu_host, overrides, field, words):
    response = post(client, auth, body(**overrides))

    assert response.status_code == 400, response.content
    errors = response.json()["errors"]
    assert field in errors, errors
    assert words in " ".join(errors[field]), errors[field]
    assert field in response.json()["detail"]
    assert not Deployment.objects.exists()


def test_nulls_turn_the_optional_settings_off(client, auth, cpu_host):
    settings = {**SETTINGS, "response_cache_seconds": None, "idle_alert_hours": None, "idle_stop_hours": None}

    response = post(client, auth, body(settings=settings))

    assert response.status_code == 200, response.content
    assert response.json()["settings"] == settings


@pytest.fixture
def deployed(client, auth, cpu_host):
    response = post(client, auth, body(engine=ENGINE, lora_adapters=ADAPTERS[:1]))
    assert response.status_code == 200, response.content
    return response.json()["deploy_id"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"engine": {"quantization": "gptq"}}, "engine.quantization"),
        ({"engine": {"max_model_len": 8192}}, "engine.max_model_len"),
        ({"engine": {"speculative": None}}, "engine.speculative"),
        ({"engine": {"speculative": {"method": "ngram", "num_speculative_tokens": 4}}}, "engine.speculative"),
        ({"task": "embed"}, "task"),
    ],
)
def test_put_that_changes_the_engine_is_a_400_naming_the_field(client, auth, deployed, change, field):
    response = put(client, auth, deployed, {**change, "settings": {"max_instances": 2}})

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {field}
    assert "fixed" in response.json()["detail"]
    deployment = Deployment.objects.get(deploy_id=deployed)
    assert deployment.engine == EngineOptions(**ENGINE) and deployment.max_instances == 1


def test_put_may_repeat_the_engine_unchanged(client, auth, deployed):
    response = put(client, auth, deployed, {"engine": ENGINE, "task": "generate"})

    assert response.status_code == 200, response.content


def test_put_changes_adapters_and_calls_the_hook(client, auth, deployed, monkeypatch):
    applied, queued = [], []
    monkeypatch.setattr(services, "reconcile_soon", applied.append)
    monkeypatch.setattr(services, "task_send", lambda name, *args: queued.append((name, args)))

    response = put(client, auth, deployed, {"lora_adapters": ADAPTERS})

    assert response.status_code == 200, response.content
    assert response.json()["lora_adapters"] == ADAPTERS
    deployment = Deployment.objects.get(deploy_id=deployed)
    assert [a.name for a in deployment.adapters] == ["sql", "chat-2"]
    assert deployment.events.filter(kind="adapters", message__contains="sql, chat-2").exists()
    assert applied == [deployment.id]
    assert queued == [("workers.tasks.deployment_adapters_apply", (deployment.id,))]

    again = put(client, auth, deployed, {"lora_adapters": ADAPTERS})  # unchanged: no event, nothing to apply
    assert again.status_code == 200 and applied == [deployment.id]
    removed = put(client, auth, deployed, {"lora_adapters": []})
    assert removed.json()["lora_adapters"] == [] and len(applied) == 2


@pytest.mark.parametrize(
    ("adapters", "field"),
    [
        ([{"name": "Bad!", "repo": "acme/l"}], "lora_adapters.0.name"),
        ([{"name": "a", "repo": "acme/l"}, {"name": "a", "repo": "acme/m"}], "lora_adapters.1.name"),
        ([{"name": f"a{i}", "repo": "acme/l"} for i in range(9)], "lora_adapters"),
        (None, "lora_adapters"),
    ],
)
def test_put_validates_adapters(client, auth, deployed, adapters, field):
    response = put(client, auth, deployed, {"lora_adapters": adapters})

    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert len(Deployment.objects.get(deploy_id=deployed).adapters) == 1


def test_put_of_adapters_on_an_embedding_model_is_refused(client, auth, cpu_host):
    deploy_id = post(client, auth, body(task="embed")).json()["deploy_id"]

    response = put(client, auth, deploy_id, {"lora_adapters": ADAPTERS[:1]})

    assert response.status_code == 400
    assert "cannot serve LoRA adapters" in response.json()["errors"]["lora_adapters"][0]


def test_put_changes_settings_and_records_an_event(client, auth, deployed):
    response = put(client, auth, deployed, {"settings": {"routing": "least_outstanding", "request_logging": True,
                                                         "response_cache_seconds": 30, "idle_stop_hours": 4}})  # fmt: skip

    assert response.status_code == 200, response.content
    shown = response.json()["settings"]
    assert (shown["routing"], shown["request_logging"], shown["response_cache_seconds"]) == (
        "least_outstanding", True, 30)  # fmt: skip
    assert (shown["idle_alert_hours"], shown["idle_stop_hours"], shown["max_instances"]) == (2.0, 4.0, 1)
    deployment = Deployment.objects.get(deploy_id=deployed)
    assert deployment.events.filter(kind="settings", message__contains="request logging on").exists()

    off = put(client, auth, deployed, {"settings": {"response_cache_seconds": None, "idle_alert_hours": None}})
    assert off.json()["settings"]["response_cache_seconds"] is None
    assert off.json()["settings"]["idle_alert_hours"] is None


@pytest.mark.parametrize(
    ("new_settings", "field"),
    [
        ({"min_instances": None}, "settings.min_instances"),
        ({"response_cache_seconds": 0}, "settings.response_cache_seconds"),
        ({"idle_stop_hours": 0}, "settings.idle_stop_hours"),
        ({"routing": "round_robin"}, "settings.routing"),
        ({"colour": "blue"}, "settings.colour"),
    ],
)
def test_put_validates_the_new_settings(client, auth, deployed, new_settings, field):
    response = put(client, auth, deployed, {"settings": new_settings})

    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_another_users_adapters_cannot_be_changed(client, auth, other_user, cpu_host):
    theirs = DeploymentFactory(user=other_user, gpu_type=GpuTypeFactory(name="CPU"))

    response = put(client, auth, theirs.deploy_id, {"lora_adapters": ADAPTERS})

    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.lora_adapters == []


# --- The dashboard: the same rules -----------------------------------------------------------------------


def form_data(**overrides):
    data = {"model_name": "web-model", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 8,
            "hf_repo": "llmhub/tiny-random-llama", "min_instances": 1, "max_instances": 1}  # fmt: skip
    data.update(overrides)
    return data


def test_the_create_page_has_a_collapsed_engine_options_section(client, user, cpu_host):
    client.force_login(user)

    html = client.get("/deployments/new").content.decode()

    assert '<details class="engine-options">' in html and "Engine options" in html
    section = html[html.index('<details class="engine-options">') : html.index("</details>")]
    for name in ("task", "quantization", "dtype", "max_model_len", "prefix_caching", "kv_cache_dtype",
                 "speculative", "lora_adapters"):  # fmt: skip
        assert f'name="{name}"' in section
    assert 'name="model_name"' not in section


def test_the_form_creates_with_engine_options(client, user, cpu_host):
    client.force_login(user)
    data = form_data(
        quantization="fp8", dtype="bfloat16", max_model_len=2048, prefix_caching="False", kv_cache_dtype="fp8",
        speculative="ngram", num_speculative_tokens=2, task="generate",
        lora_adapters="sql llmhub/tiny-random-llama-lora main\n\nchat acme/chat-lora",
    )  # fmt: skip

    response = client.post("/deployments/new", data)

    assert response.status_code == 302, response.content.decode()[-3000:]
    deployment = Deployment.objects.get()
    assert deployment.engine == EngineOptions(quantization="fp8", dtype="bfloat16", max_model_len=2048,
                                              prefix_caching=False, kv_cache_dtype="fp8",
                                              speculative={"method": "ngram", "num_speculative_tokens": 2})  # fmt: skip
    assert deployment.adapters == (LoraAdapter("sql", "llmhub/tiny-random-llama-lora", "main"),
                                   LoraAdapter("chat", "acme/chat-lora", ""))  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"max_model_len": 2_000_000}, "max_model_len", "less than or equal to 1048576"),
        ({"speculative": "ngram", "num_speculative_tokens": 12}, "num_speculative_tokens", "less than or equal to 8"),
        ({"speculative": "draft", "speculative_model": "", "num_speculative_tokens": 2}, "speculative_model",
         "Hugging Face repo id"),
        ({"speculative": "draft", "speculative_model": "bad repo", "num_speculative_tokens": 2}, "speculative_model",
         "Hugging Face repo id"),
        ({"lora_adapters": "Bad_Name acme/l"}, "lora_adapters", "Adapter 1 (name): Use lowercase"),
        ({"lora_adapters": "a acme/l\na acme/m"}, "lora_adapters", "used twice"),
        ({"lora_adapters": "just-a-name"}, "lora_adapters", "name repo"),
        ({"task": "embed", "lora_adapters": "a acme/l"}, "lora_adapters", "cannot serve LoRA adapters"),
        ({"response_cache_seconds": 0}, "response_cache_seconds", "greater than or equal to 1"),
        ({"idle_stop_hours": 0}, "idle_stop_hours", "greater than 0"),
    ],
)  # fmt: skip
def test_the_form_applies_the_same_rules(client, user, cpu_host, overrides, field, words):
    client.force_login(user)

    response = client.post("/deployments/new", form_data(**overrides))

    assert response.status_code == 400
    errors = response.context["form"].errors
    assert words in " ".join(errors[field]), errors
    assert not Deployment.objects.exists()
    if field in response.context["form"].ENGINE_FIELDS:
        assert '<details class="engine-options" open>' in response.content.decode()  # shown where the error is


def test_the_settings_form_changes_the_new_settings(client, user, cpu_host):
    deployment = DeploymentFactory(user=user, gpu_type=cpu_host.gpu_type)
    client.force_login(user)
    page = client.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    assert 'name="routing"' in page and 'name="idle_stop_hours"' in page
    assert "Off by default" in page and "prompts and responses are kept" in page

    response = client.post(f"/deployments/{deployment.deploy_id}/scale", {
        "min_instances": 1, "max_instances": 1, "cooldown_seconds": 300, "routing": "least_outstanding",
        "response_cache_seconds": "120", "request_logging": "on", "idle_alert_hours": "", "idle_stop_hours": "6",
    }, HTTP_HX_REQUEST="true")  # fmt: skip

    assert response.status_code == 200, response.content.decode()[-2000:]
    deployment.refresh_from_db()
    assert (deployment.routing, deployment.response_cache_seconds, deployment.request_logging) == (
        "least_outstanding", 120, True)  # fmt: skip
    assert (deployment.idle_alert_hours, deployment.idle_stop_hours) == (None, 6.0)  # empty: the alert is off


def test_a_scale_post_that_leaves_the_new_settings_out_keeps_them(client, user, cpu_host):
    deployment = DeploymentFactory(user=user, gpu_type=cpu_host.gpu_type, routing="least_outstanding",
                                   response_cache_seconds=60, idle_stop_hours=3)  # fmt: skip
    client.force_login(user)

    client.post(f"/deployments/{deployment.deploy_id}/scale", {"min_instances": 1, "max_instances": 2})

    deployment.refresh_from_db()
    assert deployment.max_instances == 2
    assert (deployment.routing, deployment.response_cache_seconds, deployment.idle_stop_hours) == (
        "least_outstanding", 60, 3)  # fmt: skip
    assert deployment.idle_alert_hours == 2.0


@pytest.mark.parametrize(("value", "status"), [(1.0, 200), ("1", 400), (True, 400), (1.5, 400)])
def test_numbers_are_json_numbers(client, auth, cpu_host, value, status):
    """JSON Schema counts 1.0 as an integer (schemathesis found it refused); strings and booleans are not."""
    response = post(client, auth, body(num_gpus=value))

    assert response.status_code == status, response.content
    if status == 400:
        assert response.json()["errors"]["num_gpus"] == ["Enter a whole number."]


@pytest.mark.parametrize(
    ("raw", "words"),
    [("[]", "must be a JSON object"), ("null", "must be a JSON object"), ("[" * 100_000, "Cannot parse"),
     (b"\xff\xfe{", "not UTF-8"), ('{"a": 1,}', "Malformed JSON at line 1 column 9")],
)  # fmt: skip
def test_bodies_that_are_not_a_json_object_are_a_400(client, auth, cpu_host, raw, words):
    response = client.post("/deploy/llm", raw, content_type="application/json", **auth)

    assert response.status_code == 400
    assert words in response.json()["detail"]


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_go_on_to_django(client, auth, cpu_host, monkeypatch, settings, debug):
    """A database outage is not the API's to answer: the error reaches Django's handling, also with DEBUG on
    (where django-ninja would answer a traceback itself), and the site's middleware turns it into a 503 in the
    API's shape, with Retry-After."""
    from django.db import OperationalError

    from llmhub.deployments import selectors

    settings.DEBUG = debug

    def down(user):
        raise OperationalError("connection refused")

    monkeypatch.setattr(selectors, "deployments_visible", down)

    response = client.get("/deploy/list", **auth)
    assert response.status_code == 503 and int(response["Retry-After"]) > 0
    assert set(response.json()) == {"detail"} and "temporarily unavailable" in response.json()["detail"]
    assert "Traceback" not in response.content.decode()


def test_an_adapter_pinned_to_a_revision_is_refused_naming_the_field(client, auth, cpu_host):
    """vLLM loads an adapter by repo id, never at a revision: a pinned one would silently be served from the
    default branch, so it is a field error (null, "" and "main" are the default branch)."""
    adapters = [{"name": "a", "repo": "acme/a", "revision": "main"}, {"name": "b", "repo": "acme/b", "revision": "v2"}]
    response = post(client, auth, body(lora_adapters=adapters))
    assert response.status_code == 400
    assert "'v2' cannot be pinned" in response.json()["errors"]["lora_adapters.1.revision"][0]
    assert list(response.json()["errors"]) == ["lora_adapters.1.revision"]
