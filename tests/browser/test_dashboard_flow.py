"""A user in a real browser (Playwright driving Debian's Chromium) against the real stack: sign in,
create a deployment with the form (live cost estimate), watch its badge reach `running` without
reloading, chat with it, change its scale, read its API examples, create an API token, delete the
deployment with the trash icon. Screenshots go to test-artifacts/browser/."""

import re

import pytest
from playwright.sync_api import expect

from tests.browser_support import chromium_page
from tests.conftest import ARTIFACTS
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.vllm, pytest.mark.docker]

def test_create_watch_chat_and_delete(stack):
    UserFactory(username="carol", password="carol-password-1")
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)

    with chromium_page(width=1280, height=860, timeout_ms=30_000) as page:

        page.goto(f"{stack}/deployments/")
        expect(page).to_have_url(re.compile(r"/login/"))
        page.fill("input[name=username]", "carol")
        page.fill("input[name=password]", "carol-password-1")
        page.screenshot(path=shots / "01-login.png")
        page.click("button[type=submit]")
        expect(page.get_by_text("No deployments yet")).to_be_visible()
        page.screenshot(path=shots / "02-empty-list.png")

        page.click("text=Create your first deployment")
        page.fill("input[name=model_name]", "browser-llama")
        page.select_option("select[name=gpu]", "CPU")
        page.fill("input[name=max_batch_size]", "4")
        page.fill("input[name=hf_repo]", "llmhub/tiny-random-llama")
        page.fill("input[name=min_instances]", "3")
        page.fill("input[name=max_instances]", "1")
        expect(page.locator("#estimate")).to_contain_text("Per month")  # live cost as the user types
        expect(page.locator("#errors-min_instances")).to_contain_text("must not be more than")  # live validation
        page.click("button:has-text('Deploy')")
        expect(page.locator(".has-error .error")).to_contain_text("must not be more than max instances")
        page.screenshot(path=shots / "03-form-error.png", full_page=True)
        page.fill("input[name=min_instances]", "1")
        page.click("button:has-text('Deploy')")

        badge = page.locator("h1 .badge")
        expect(badge).to_have_text("deploying")
        page.screenshot(path=shots / "04-deploying.png", full_page=True)
        # Swapped in by htmx polling, no reload.
        expect(badge).to_have_text(re.compile("running|failed"), timeout=600_000)
        expect(badge).to_have_text("running")
        expect(page.locator("#live")).to_contain_text("ready", timeout=10_000)
        page.screenshot(path=shots / "05-running.png", full_page=True)

        page.fill("#scale-form input[name=max_instances]", "2")
        page.click("#scale-form button")
        expect(page.locator("#messages")).to_contain_text("now runs 1–2 instances")
        page.screenshot(path=shots / "07-scaled.png", full_page=True)

        page.click("text=model page")  # the web demo, /carol/browser-llama
        expect(page).to_have_url(re.compile(r"/carol/browser-llama$"))
        page.fill("#chat-input", "Hello, who are you?")
        page.click("#chat-form button")
        reply = page.locator(".msg-assistant").last
        expect(reply).not_to_have_class(re.compile("streaming"), timeout=60_000)
        expect(reply).not_to_be_empty()
        expect(reply).not_to_have_class(re.compile("msg-error"))
        page.screenshot(path=shots / "06-chat.png", full_page=True)

        page.click("nav.tabs >> text=API")
        expect(page.locator("pre.code").first).to_contain_text('"model": "carol/browser-llama"')
        page.screenshot(path=shots / "08-model-api.png", full_page=True)

        page.click("nav >> text=API tokens")
        page.fill("input[name=name]", "laptop")
        page.click("button:has-text('Create token')")
        secret = page.locator("#new-token-secret").inner_text()
        assert secret.startswith("lh-")
        page.screenshot(path=shots / "09-token-created.png", full_page=True)
        page.goto(page.url)  # a fresh GET of the tokens page
        expect(page.get_by_text(secret)).to_have_count(0)  # shown once

        page.click("nav >> text=Deployments")
        row = page.locator("tr", has_text="carol/browser-llama")
        expect(row.locator(".badge")).to_have_text("running")
        page.screenshot(path=shots / "10-list.png", full_page=True)
        page.once("dialog", lambda dialog: dialog.accept())
        row.locator("button[title^='Delete']").click()
        expect(row).to_have_count(0)
        expect(page.locator("#messages")).to_contain_text("Deleting carol/browser-llama")
        page.screenshot(path=shots / "11-deleted.png", full_page=True)
