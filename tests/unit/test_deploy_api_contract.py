"""The deploy API's contract: an OpenAPI 3 document generated from the same schemas that validate requests,
a docs page from local static files, and schemathesis fuzzing the live ASGI app against the document."""

import asyncio
import re
from collections import Counter

import pytest
import schemathesis
from asgiref.sync import sync_to_async
from django.contrib.staticfiles import finders
from django.db import connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory, token_for

# Bounded so the fuzzing stays well under a minute on a 2-core machine (5 operations, about 15 s).
MAX_EXAMPLES = 40


def test_the_openapi_document_needs_no_token(client):
    response = client.get("/deploy/openapi.json")

    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/deploy/llm", "/deploy/list", "/deploy/{deploy_id}"}
    assert set(doc["paths"]["/deploy/{deploy_id}"]) == {"get", "put", "delete"}
    assert doc["components"]["securitySchemes"]["ApiToken"] == {"type": "http", "scheme": "bearer"}
    schemas = doc["components"]["schemas"]
    # The request body declares every field, nested sections included, and refuses others.
    create = schemas["DeployIn"]
    assert {"model_name", "gpu", "num_gpus", "max_batch_size", "hf", "settings", "task", "engine",
            "lora_adapters"} == set(create["properties"])  # fmt: skip
    assert create["additionalProperties"] is False
    assert schemas["SettingsIn"]["properties"]["min_instances"]["maximum"] == 64
    assert schemas["EngineIn"]["properties"]["dtype"]["enum"] == ["auto", "bfloat16", "float16", "float32"]
    assert schemas["DeployIn"]["properties"]["lora_adapters"]["maxItems"] == 8
    # Responses: the deploy object never carries the Hugging Face token; errors in the documented shape.
    assert "token" not in schemas["HfOut"]["properties"]
    post = doc["paths"]["/deploy/llm"]["post"]
    assert {"200", "400", "401"} <= set(post["responses"])
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")


def test_the_docs_page_loads_swagger_ui_from_local_static_files(client):
    response = client.get("/deploy/docs")

    assert response.status_code == 200
    html = response.content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(s.endswith("swagger-ui-bundle.js") for s in sources), sources
    assert all(s.startswith("/") for s in sources), sources  # nothing from another site (no CDN)
    assert "/deploy/openapi.json" in html
    for source in sources:
        if source.startswith("/static/"):
            assert finders.find(source.removeprefix("/static/")), f"{source} is not a local static file"


def test_the_docs_static_files_are_served(client):
    html = client.get("/deploy/docs").content.decode()
    bundle = re.search(r'src="(/static/[^"]*swagger-ui-bundle\.js)"', html).group(1)

    response = client.get(bundle)

    assert response.status_code == 200
    assert b"SwaggerUIBundle" in b"".join(response.streaming_content)


@pytest.fixture
def api_schema(transactional_db, settings):
    """The document as the live ASGI app (llmhub.asgi: the site's body bounds and early authentication
    included) serves it; a user with a token, a CPU host to deploy on and one deployment of theirs."""
    from llmhub.asgi import application

    settings.HF_HUB_OFFLINE = True  # the fit check reads only the local cache: generated repos are made up
    cpu = GpuTypeFactory(name="CPU")
    HostFactory(name="local", gpu_type=cpu, gpu_count=8)
    user = UserFactory(username="fuzz", gpu_quota=30_000)  # the quota is tested elsewhere
    schema = schemathesis.openapi.from_asgi("/deploy/openapi.json", application)
    schema.token = token_for(user)
    schema.deploy_id = DeploymentFactory(user=user, gpu_type=cpu, max_instances=1).deploy_id
    yield schema

    async def close():  # the connections of the app's own thread (asgiref's thread for sync code)
        await sync_to_async(connections.close_all)()

    asyncio.run(close())


def aimed(case, aim: bool):
    """A generated request, half the time aimed at what exists and at what the rules beyond the document
    accept (the user's deployment, the offered GPU type, min ≤ max, one kind of speculative decoding, no
    adapters on an embedding model), so that the happy paths are fuzzed too. Invalid (negative) requests
    are left as generated."""
    if not aim or case.meta.generation.mode != GenerationMode.POSITIVE:
        return case
    if "deploy_id" in (case.path_parameters or {}):
        case.path_parameters["deploy_id"] = case.operation.schema.deploy_id
    body = case.body if isinstance(case.body, dict) else {}
    if case.method.upper() == "PUT":  # the fields that may change once deployed
        body = case.body = {key: value for key, value in body.items() if key in ("settings", "lora_adapters")}
    if case.operation.path == "/deploy/llm":
        body["gpu"] = "CPU"
        if body.get("task") == "embed":
            body["lora_adapters"], body.setdefault("engine", {})["speculative"] = [], None
        speculative = (body.get("engine") or {}).get("speculative")
        if speculative and speculative.get("method") and speculative.get("model"):
            del speculative["model"]
        elif speculative and not speculative.get("method") and not speculative.get("model"):
            speculative["method"] = "ngram"
    names = [adapter["name"] for adapter in body.get("lora_adapters") or []]
    if len(set(names)) < len(names):
        body["lora_adapters"] = body["lora_adapters"][:1]
    scale = body.get("settings") or {}
    if "min_instances" in scale and "max_instances" in scale and scale["min_instances"] > scale["max_instances"]:
        scale["min_instances"], scale["max_instances"] = scale["max_instances"], scale["min_instances"]
    return case


@pytest.mark.django_db(transaction=True)
def test_the_api_keeps_to_its_document(api_schema):
    """No 5xx, and every answer (status, content type, body) is one the document declares, for each
    operation with MAX_EXAMPLES generated requests (valid and invalid ones)."""
    headers = {"Authorization": f"Bearer {api_schema.token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]  # fmt: skip
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 5
    statuses = Counter()

    for operation in operations:

        cases = st.one_of(operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))

        @given(case=st.builds(aimed, cases, st.booleans()))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            response = case.call_and_validate(headers=headers, checks=checks)
            statuses[(case.operation.method.upper(), case.operation.path, response.status_code)] += 1

        fuzz()

    # The fuzzing reached the happy paths, not only the refusals.
    assert statuses[("POST", "/deploy/llm", 200)] and statuses[("PUT", "/deploy/{deploy_id}", 200)], statuses
