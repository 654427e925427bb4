"""The deploy API's docs page in a real browser (Playwright driving Debian's Chromium): Swagger UI renders
the OpenAPI document with every operation, loading nothing from another site. Screenshot in
test-artifacts/browser/deploy-docs.png."""

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.browser_support import CHROMIUM_ARGS
from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_the_docs_page_renders_from_local_files_only(live_server):
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    here = urlsplit(live_server.url).netloc
    requested, elsewhere = [], []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)

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
        browser.close()

    assert elsewhere == [], f"the docs page asked another site for {elsewhere}"
    assert any(url.endswith("/static/ninja/swagger-ui-bundle.js") for url in requested), requested
    assert any(url.endswith("/deploy/openapi.json") for url in requested), requested
