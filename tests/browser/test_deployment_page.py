"""The deployment page in a real browser (Playwright driving Debian's Chromium) against Django's live server,
under a controlled clock: it polls only its live fragment (never the whole page, never the charts), the charts
refresh when the tab becomes visible again, the request log searches, pages and downloads, and the idle banner
scales the deployment to zero in one click. Screenshots go to test-artifacts/browser/deployment-page/."""

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from playwright.sync_api import expect

from llmhub.billing.limits import billing_account_get
from llmhub.fleet.models import Instance
from llmhub.gateway.idle import idle_check_all
from llmhub.gateway.models import RequestLog, UsageRecord
from tests.browser_support import chromium_page, sign_in
from tests.conftest import ARTIFACTS
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

T0 = datetime(2026, 3, 4, 15, 0, tzinfo=UTC)


@pytest.fixture
def clock():
    with time_machine.travel(T0, tick=True) as traveller:  # ticks: the live server serves in real time from T0
        yield traveller


@pytest.fixture
def deployment(clock):
    """dora/assistant on 1 × H100 (3.00 USD per GPU-hour), alerting after half an hour idle: an instance running
    since 12:00, 30 requests (logged) from 14:00 to 14:29, none since; one of them about photosynthesis."""
    user = UserFactory(username="dora", password="dora-password-1", email="dora@example.com")
    billing_account_get(user=user)
    h100 = GpuTypeFactory(name="H100", memory_gb=80, hourly_price=Decimal("3.00"), uses_devices=True)
    deployment = DeploymentFactory(user=user, gpu_type=h100, model_name="assistant", status="running",
                                   request_logging=True, idle_alert_hours=0.5, min_instances=1, max_instances=2, target_instances=1)  # fmt: skip
    Instance.objects.create(deployment=deployment, host=HostFactory(name="gpu-1", gpu_type=h100, gpu_count=8),
                            gpu_indexes=[0], gpu_type_id=h100.id, num_gpus=1, state="ready", container_id="c",
                            port=40000, started_at=T0 - timedelta(hours=3), ready_at=T0 - timedelta(hours=3))  # fmt: skip
    deployment.events.create(kind="ready", message="instance 1 ready")
    topics = ["photosynthesis" if i == 7 else f"topic {i}" for i in range(30)]
    for i, topic in enumerate(topics):
        at = T0 - timedelta(hours=1) + timedelta(minutes=i)
        UsageRecord.objects.create(deployment=deployment, user=user, created_at=at, endpoint="chat/completions",
                                   status=200, prompt_tokens=12, completion_tokens=40 + i, latency_ms=300 + 10 * i)  # fmt: skip
        RequestLog.objects.create(deployment=deployment, created_at=at, model=deployment.full_name,
                                  endpoint="chat/completions", stream=i % 2 == 0, status=200, prompt_tokens=12,
                                  completion_tokens=40 + i, latency_ms=300 + 10 * i,
                                  messages=[{"role": "user", "content": f"Explain {topic}"}],
                                  prompt=f"user: Explain {topic}", response=f"Here is {topic}, briefly.")  # fmt: skip
    return deployment


def test_live_fragments_request_log_and_idle_banner(live_server, deployment, clock):
    shots = ARTIFACTS / "browser" / "deployment-page"
    shots.mkdir(parents=True, exist_ok=True)
    idle_check_all()  # 15:00, the last request at 14:29
    url = f"{live_server.url}/deployments/{deployment.deploy_id}/"

    with chromium_page(width=1280, height=900, timeout_ms=15_000, accept_downloads=True) as page:
        sign_in(page, url, "dora", "dora-password-1")
        expect(page.locator("h1")).to_contain_text("dora/assistant")

        # The idle banner: the spell's cost since the last request (14:29 → 15:00 at 3.00 USD per hour).
        banner = page.locator(".idle-banner")
        expect(banner).to_contain_text("dora/assistant has had no request for 31 min (since 2026-03-04 14:29 UTC)")
        expect(banner).to_contain_text("1.55 USD since its last request, 3.00 USD per hour")

        # The request log section, loaded into the page.
        log = page.locator("#request-logs")
        expect(log).to_contain_text("page 1 of 2 · 30 requests")
        expect(page.locator("#charts svg")).to_have_count(3)
        page.screenshot(path=shots / "01-page.png", full_page=True)

        # Polling: only the live fragment, every 3 s; never the whole page, never the charts.
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        page.wait_for_timeout(7_000)
        paths = [re.sub(r"^https?://[^/]+", "", u) for u in asked]
        live = f"/deployments/{deployment.deploy_id}/live"
        assert paths.count(live) >= 2, paths
        assert not [p for p in paths if p.endswith("/charts") or p.rstrip("/").endswith(deployment.deploy_id)], paths
        expect(page.locator("#live")).to_contain_text("instance 1 ready")

        # The charts come back when the tab becomes visible again, not while hidden.
        asked.clear()
        page.evaluate("""state => { Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
                                     document.dispatchEvent(new Event('visibilitychange')); }""", "hidden")  # fmt: skip
        page.wait_for_timeout(1_000)
        assert not [u for u in asked if u.endswith("/charts")]
        with page.expect_request(re.compile(r"/charts$")):
            page.evaluate("""state => { Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
                                         document.dispatchEvent(new Event('visibilitychange')); }""", "visible")  # fmt: skip
        expect(page.locator("#charts svg")).to_have_count(3)

        # Search, paging, download.
        log.locator("input[name=q]").fill("photosynthesis")
        expect(log).to_contain_text("page 1 of 1 · 1 request")
        expect(log.locator("pre.answer")).to_have_text("Here is photosynthesis, briefly.")
        page.locator("#request-log-card").screenshot(path=shots / "02-request-log-search.png")
        with page.expect_download() as download_info:
            log.locator("text=Download JSONL").click()
        lines = [json.loads(line) for line in open(download_info.value.path()).read().splitlines()]
        assert [line["prompt"] for line in lines] == ["user: Explain photosynthesis"]
        log.locator("input[name=q]").fill("")
        expect(log).to_contain_text("page 1 of 2")
        log.locator("text=older →").click()
        expect(log).to_contain_text("page 2 of 2 · 30 requests")
        expect(log).to_contain_text("Explain topic 0")
        page.locator("#request-log-card").screenshot(path=shots / "03-request-log-page-2.png")

        # One click on the banner scales the deployment to zero.
        banner.locator("button", has_text="Scale to zero").click()
        expect(page.locator("#messages")).to_contain_text("dora/assistant scales to zero")
        expect(page.locator(".idle-banner")).to_have_count(0)
        expect(page.locator("#summary")).to_contain_text("0–2 instances")
        expect(page.locator("#live")).to_contain_text("1–2 → 0–2 instances, scaled to zero: by the owner")
        page.screenshot(path=shots / "04-scaled-to-zero.png", full_page=True)

    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.desired_instances) == (0, 0)


def test_forms_show_their_errors_in_place_and_adapters_change(live_server, deployment, monkeypatch):
    """A form answered 400 with its errors is swapped in (htmx 2 leaves 4xx answers out by default, so an
    error used to show nothing); a valid adapters list replaces the listed adapters."""
    monkeypatch.setattr("llmhub.deployments.services.reconcile_soon", lambda deployment_id: None)
    shots = ARTIFACTS / "browser" / "deployment-page"
    shots.mkdir(parents=True, exist_ok=True)
    with chromium_page(width=1280, height=900, timeout_ms=15_000) as page:
        sign_in(page, f"{live_server.url}/deployments/{deployment.deploy_id}/", "dora", "dora-password-1")

        page.fill("#scale-form input[name=min_instances]", "3")
        page.click("#scale-form button[type=submit]")
        expect(page.locator("#scale-form .error")).to_contain_text("must not be more than max instances (2)")

        adapters = page.locator("#adapters-form")
        adapters.locator("textarea").fill("sql llmhub/tiny-random-llama-lora\nBad_Name acme/x")
        adapters.locator("button[type=submit]").click()
        expect(page.locator("#adapters-form .error")).to_contain_text("Adapter 2 (name)")
        page.locator("#adapters-form").screenshot(path=str(shots / "05-adapters-error.png"))

        page.locator("#adapters-form textarea").fill("sql llmhub/tiny-random-llama-lora")
        page.locator("#adapters-form button[type=submit]").click()
        expect(page.locator("#adapters-form li")).to_have_text(["dora/assistant:sql llmhub/tiny-random-llama-lora"])
        page.locator("#adapters-form").screenshot(path=str(shots / "06-adapters.png"))
    deployment.refresh_from_db()
    assert [a.name for a in deployment.adapters] == ["sql"]
