"""A user in a real browser (Playwright driving Debian's Chromium) on the billing pages, served by Django's
live server over GPU time recorded in the database: the usage page and its plots, a bad limit, the
threshold banner, suspension at the limit and resumption, an invoice with its instance intervals and its
print-ready view saved as a PDF. Screenshots go to test-artifacts/browser/.

The clock is controlled: the test process (and so the live server's threads) runs from a Thursday noon UTC,
so "three days ago" is always this week's Monday, after last week's invoice, whatever day the suite runs.
"""

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.utils import timezone
from playwright.sync_api import expect

from llmhub.billing import invoices
from llmhub.billing.metering import cost_by_user
from llmhub.billing.periods import WEEK, month_start, week_start
from llmhub.fleet.models import Instance
from tests.billing_support import run
from tests.browser_support import chromium_page, sign_in
from tests.conftest import ARTIFACTS
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


@pytest.fixture
def clock():
    """Thursday 2026-03-12 12:00 UTC, then running (the browser's waits take real time): the live server reads
    this clock, and this month started 11 days ago, last Monday 3 days ago."""
    with time_machine.travel(datetime(2026, 3, 12, 12, tzinfo=UTC), tick=True) as traveller:
        yield traveller


@pytest.fixture
def history(clock):
    """Carol's GPU time: a 2 × H100 model on for a day last week and this month's first days, a 1 × H100
    model running since 5 hours ago, and a deleted one that ran for 3 hours."""
    now = timezone.now()
    h100 = GpuTypeFactory(name="H100", memory_gb=80, hourly_price=Decimal("2.49"), uses_devices=True)
    host = HostFactory(name="gpu-1", gpu_type=h100, gpu_count=8)
    user = UserFactory(username="carol", password="carol-password-1", email="carol@example.com")
    big = DeploymentFactory(user=user, gpu_type=h100, num_gpus=2, model_name="llama-70b", status="running")
    small = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="qwen-8b", status="running")
    gone = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="old", status="deleted")
    last_week = week_start(now) - WEEK
    run(big, host, last_week + timedelta(hours=9), last_week + timedelta(hours=33))
    first = max(month_start(now), now - timedelta(days=3))
    run(big, host, first + timedelta(hours=2), first + timedelta(hours=12))
    run(gone, host, first + timedelta(hours=4), first + timedelta(hours=7))
    run(small, host, now - timedelta(hours=5))
    invoices.invoices_build_due(now=now)
    return user


def month_spend(user) -> Decimal:
    now = timezone.now()
    return cost_by_user(user_ids=[user.id], start=month_start(now), end=now, now=now)[user.id]


def test_usage_limit_banner_suspension_and_invoice(live_server, history):
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    url = live_server.url
    spend = month_spend(history)  # (no database calls inside Playwright's event loop)
    instance = Instance.objects.filter(deployment__model_name="llama-70b").order_by("id").first()
    with chromium_page(width=1280, height=900, timeout_ms=20_000) as page:

        sign_in(page, f"{url}/billing/", "carol", "carol-password-1")
        expect(page).to_have_url(re.compile(r"/billing/$"))
        expect(page.locator("#running-cost")).to_have_text("$2.49/h")
        expect(page.locator("svg.chart").first.locator("rect").first).to_be_visible()
        expect(page.locator(".legend")).to_contain_text("carol/old (deleted)")
        expect(page.get_by_text("Payment collection is off")).to_be_visible()
        page.screenshot(path=shots / "billing-01-usage.png", full_page=True)

        page.click("nav.tabs >> text=Spending limit")
        page.fill("input[name=monthly_limit]", "-5")
        page.click("button:has-text('Save')")
        expect(page.locator("#errors-monthly_limit")).to_contain_text("greater than or equal to 0.01")
        page.screenshot(path=shots / "billing-02-limit-error.png", full_page=True)

        page.fill("input[name=monthly_limit]", f"{spend / Decimal('0.85'):.2f}")  # 85 % used
        page.click("button:has-text('Save')")
        banner = page.locator("#billing-banner")
        expect(banner).to_contain_text("You have reached 80 % of your monthly spending limit")
        page.click("nav >> text=Deployments")
        expect(banner).to_be_visible()  # on every page
        page.screenshot(path=shots / "billing-03-banner-80.png", full_page=True)

        page.click("nav >> text=Billing")
        page.click("nav.tabs >> text=Spending limit")
        page.fill("input[name=monthly_limit]", f"{spend / 2:.2f}")
        page.click("button:has-text('Save')")
        expect(page.locator("#messages")).to_contain_text("2 deployment(s) suspended")
        expect(banner).to_contain_text("Spending limit reached: your deployments are suspended")
        page.screenshot(path=shots / "billing-04-suspended.png", full_page=True)
        page.click("nav >> text=Deployments")
        row = page.locator("tr", has_text="carol/qwen-8b")
        expect(row.locator(".badge")).to_have_text("suspended")
        expect(row).to_contain_text("suspended: spending limit reached")
        page.screenshot(path=shots / "billing-05-deployments-suspended.png", full_page=True)

        page.click("nav >> text=Billing")
        page.click("nav.tabs >> text=Spending limit")
        page.fill("input[name=monthly_limit]", "5000")
        page.click("button:has-text('Save')")
        expect(page.locator("#messages")).to_contain_text("2 suspended deployment(s) resumed")
        expect(banner).to_have_count(0)
        page.screenshot(path=shots / "billing-06-resumed.png", full_page=True)

        page.click("nav.tabs >> text=Invoices")
        page.locator("#invoice-list a").first.click()
        expect(page.locator("#invoice-lines")).to_contain_text("carol/llama-70b")
        expect(page.locator("#invoice-total")).to_have_text("$119.52")  # 24 h × 2 GPUs × 2.49 USD
        page.locator("details summary").first.click()
        expect(page.locator("details").first).to_contain_text(f"#{instance.id}")
        page.screenshot(path=shots / "billing-07-invoice.png", full_page=True)

        page.click("text=Print / PDF")
        expect(page.locator(".invoice-sheet")).to_contain_text("Billed to")
        page.screenshot(path=shots / "billing-08-invoice-print.png", full_page=True)
        page.emulate_media(media="print")
        page.pdf(path=shots / "billing-invoice.pdf", format="A4")
    assert (shots / "billing-invoice.pdf").read_bytes().startswith(b"%PDF")
