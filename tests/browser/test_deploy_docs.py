"""The deploy API's docs page in a real browser (Playwright driving Debian's Chromium): Swagger UI renders
the OpenAPI document with every operation, loading nothing from another site. Screenshot in
test-artifacts/browser/deploy-docs.png."""

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser_support import chromium_page, sign_in
from tests.conftest import ARTIFACTS
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_the_docs_page_renders_from_local_files_only(live_server):
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    here = urlsplit(live_server.url).netloc
    requested, elsewhere = [], []

    with chromium_page(width=1280, height=1000, timeout_ms=20_000) as page:

        def watch(route):
            url = route.request.url
            requested.append(url)
            if urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc != here:
                elsewhere.append(url)
                return route.abort()
            return route.continue_()

        page.route("**/*", watch)
        page.goto(f"{live_server.url}/deploy/docs")

        expect(page.locator(".swagger-ui .info .title")).to_contain_text("LLMHub deploy API")
        for path in ("/deploy/llm", "/deploy/list", "/deploy/{deploy_id}"):
            expect(page.locator(".opblock-summary-path", has_text=path).first).to_be_visible()
        expect(page.locator(".opblock")).to_have_count(5)
        page.locator(".opblock-summary-path", has_text="/deploy/llm").first.click()
        expect(page.locator(".opblock-body").first).to_contain_text("model_name")
        page.screenshot(path=shots / "deploy-docs.png", full_page=False)

    assert elsewhere == [], f"the docs page asked another site for {elsewhere}"
    assert any(url.endswith("/static/ninja/swagger-ui-bundle.js") for url in requested), requested
    assert any(url.endswith("/deploy/openapi.json") for url in requested), requested


def test_the_engine_options_section_and_the_settings_form(live_server):
    """The create page's "Engine options" are collapsed with their defaults, and open to be changed; the
    deployment page's settings form shows routing, response cache, request logging (off by default) and
    the idle guard."""
    user = UserFactory(username="dora", password="dora-password-1")
    cpu = GpuTypeFactory(name="CPU")
    HostFactory(name="local", gpu_type=cpu, gpu_count=2)
    deployment = DeploymentFactory(user=user, gpu_type=cpu, model_name="settings-demo")
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)

    with chromium_page(width=1280, height=1000, timeout_ms=20_000) as page:
        sign_in(page, f"{live_server.url}/login/", "dora", "dora-password-1")

        page.goto(f"{live_server.url}/deployments/new")
        expect(page.locator("select[name=dtype]")).to_be_hidden()  # collapsed
        page.click("summary:has-text('Engine options')")
        expect(page.locator("select[name=dtype]")).to_have_value("auto")
        expect(page.locator("select[name=prefix_caching]")).to_have_value("True")
        expect(page.locator("select[name=task]")).to_have_value("generate")
        page.locator("details.engine-options").screenshot(path=shots / "engine-options.png")

        page.goto(f"{live_server.url}/deployments/{deployment.deploy_id}/")
        form = page.locator("#scale-form")
        expect(form).to_contain_text("Off by default")
        expect(form.locator("input[name=request_logging]")).not_to_be_checked()
        form.locator("select[name=routing]").select_option("least_outstanding")
        form.locator("input[name=idle_stop_hours]").fill("6")
        form.locator("button[type=submit]").click()
        expect(form.locator("input[name=idle_stop_hours]")).to_have_value("6.0")
        form.screenshot(path=shots / "settings-form.png")

    deployment.refresh_from_db()
    assert (deployment.routing, deployment.idle_stop_hours) == ("least_outstanding", 6.0)
