"""Billing pages: usage numbers and plots, invoices (own only), print view, settings form errors, and the
usual view checks (anonymous → login, wrong method → 405, someone else's invoice → 404)."""

import html
import re
from decimal import Decimal

import pytest

from llmhub.billing import invoices, limits
from llmhub.billing.models import BillingAccount
from tests.billing_support import MONDAY, at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def usage(clock, user, other_user):
    """Alice ran 2 × L4 (1.00 USD/GPU-hour) for 10 h in week 10 and runs it again since Tuesday 06:00 of
    week 11; Bob has an invoice of his own."""
    l4 = GpuTypeFactory(name="L4", hourly_price=Decimal("1.00"), uses_devices=True)
    host = HostFactory(name="gpu-1", gpu_type=l4, gpu_count=8)
    mine = DeploymentFactory(user=user, gpu_type=l4, num_gpus=2, model_name="chat", status="running")
    theirs = DeploymentFactory(user=other_user, gpu_type=l4, num_gpus=1, model_name="x", status="running")
    run(mine, host, at(3, 8), at(3, 18))
    run(theirs, host, at(3, 8), at(3, 9))
    run(mine, host, at(10, 6))
    clock.move_to(at(10, 12))
    invoices.invoices_build_due()
    return mine


def test_the_usage_page_shows_week_month_projection_and_plots(client, user, usage):
    client.force_login(user)

    page = client.get("/billing/").content.decode()

    # Week 11 so far: 6 h × 2 GPUs × 1.00; March so far: 20 + 12 GPU-hours.
    assert re.search(r'id="week-cost">\$12\.00<', page)
    assert re.search(r'id="month-cost">\$32\.00<', page)
    assert re.search(r'id="running-cost">\$2\.00/h<', page)
    # Projection: 32 + 2 USD/h × 21.5 days left (Mar 10 12:00 → Apr 1) = 32 + 1032.
    assert re.search(r'id="projected-cost">\$1064\.00<', page)
    assert "Payment collection is off" in page
    assert page.count("<svg") == 2 and "alice/chat, Mar 03: 20.00 USD" in page
    assert "alice/chat, Mar 10: 12.000 GPU-hours" in page
    assert "bob/x" not in page
    live = client.get("/billing/", HTTP_HX_REQUEST="true").content.decode()
    assert live.startswith('\n<div id="usage-live"') or live.lstrip().startswith('<div id="usage-live"')
    assert "<html" not in live


def test_invoices_list_detail_and_print_show_only_the_users_own(client, user, other_user, usage):
    client.force_login(user)
    mine = user.billing.invoices.get()
    theirs = other_user.billing.invoices.get()

    listing = client.get("/billing/invoices/").content.decode()
    detail = client.get(f"/billing/invoices/{mine.number}/").content.decode()
    printable = client.get(f"/billing/invoices/{mine.number}/print").content.decode()

    assert mine.number in listing and theirs.number not in listing
    assert "$20.00" in listing
    for page in (detail, printable):
        assert "alice/chat" in page and "L4" in page and "20.0000" in page and "$20.00" in page
        assert f"#{usage.instances.order_by('id').first().id}" in page  # the instance interval behind the line
        assert "2026-03-03 08:00:00" in page and "2026-03-03 18:00:00" in page
        assert "gpu-1" not in page and "Host" not in page  # users see no host detail (operators: the admin)
        assert "not billed" not in page  # billing follows the run intervals: no suspended-time exception
    assert "window.print()" in printable and 'class="topbar"' not in printable
    assert client.get(f"/billing/invoices/{theirs.number}/").status_code == 404
    assert client.get(f"/billing/invoices/{theirs.number}/print").status_code == 404
    assert client.get("/billing/invoices/2026W10-99999/").status_code == 404


@pytest.mark.parametrize(
    "url", ["/billing/", "/billing/invoices/", "/billing/settings/", "/billing/invoices/2026W10-00001/"]
)
def test_anonymous_users_are_sent_to_login(client, url):
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize(
    ("method", "url"),
    [("post", "/billing/"), ("delete", "/billing/settings/"), ("post", "/billing/invoices/"),
     ("get", "/billing/stripe/webhook")],
)  # fmt: skip
def test_wrong_methods_are_405(client, user, method, url):
    client.force_login(user)
    assert getattr(client, method)(url).status_code == 405


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"monthly_limit": "-5"}, "monthly_limit", "greater than or equal to 0.01"),
        ({"monthly_limit": "0"}, "monthly_limit", "greater than or equal to 0.01"),
        ({"monthly_limit": "ten"}, "monthly_limit", "Enter a number"),
        ({"monthly_limit": "10.001"}, "monthly_limit", "no more than 2 decimal places"),
        ({"alert_thresholds": "50, lots"}, "alert_thresholds", "'lots' is not a whole percentage"),
        ({"alert_thresholds": "50, 150"}, "alert_thresholds", "150 % is outside 1–100 %"),
        ({"alert_email": "not-an-address"}, "alert_email", "valid email"),
        ({"alert_webhook_url": "ftp://example.com/x"}, "alert_webhook_url", "Use an http:// or https:// URL"),
        ({"alert_webhook_url": "http://"}, "alert_webhook_url", "valid URL"),
    ],
)
def test_bad_settings_are_form_errors_and_nothing_is_saved(client, user, data, field, message):
    client.force_login(user)
    form = {"monthly_limit": "100", "alert_thresholds": "50, 80, 100", "alert_email": "", "alert_webhook_url": ""}

    response = client.post("/billing/settings/", {**form, **data})

    assert response.status_code == 400
    page = html.unescape(response.content.decode())
    assert f'id="errors-{field}"' in page and message in page
    account = BillingAccount.objects.get(user=user)
    assert (account.monthly_limit, account.alert_thresholds) == (None, [50, 80, 100])


def test_saving_the_limit_checks_it_at_once(client, user, usage, clock):
    client.force_login(user)
    form = {"monthly_limit": "30", "alert_thresholds": "50%, 80 ,100", "alert_email": "", "alert_webhook_url": ""}

    response = client.post("/billing/settings/", form, follow=True)

    page = response.content.decode()
    assert response.redirect_chain == [("/billing/settings/", 302)]
    assert "Saved: monthly spending limit 30.00 USD." in page
    assert "already reaches the limit: 1 deployment(s) suspended." in page
    assert "Spending limit reached: your deployments are suspended" in page
    account = BillingAccount.objects.get(user=user)
    assert (account.monthly_limit, account.alert_thresholds) == (Decimal("30.00"), [50, 80, 100])

    page = client.post("/billing/settings/", {**form, "monthly_limit": ""}, follow=True).content.decode()
    assert "Saved: no monthly spending limit." in page and "1 suspended deployment(s) resumed" in page
    assert 'id="billing-banner"' not in page


def test_stripe_secrets_are_never_shown(client, user, usage, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_do_not_show_me"
    settings.STRIPE_WEBHOOK_SECRET = "whsec_do_not_show_me"
    client.force_login(user)
    invoice = user.billing.invoices.get()

    for url in ("/billing/", "/billing/invoices/", f"/billing/invoices/{invoice.number}/", "/billing/settings/"):
        page = client.get(url).content.decode()
        assert "do_not_show_me" not in page and "Payment collection is off" not in page


def test_the_webhook_refuses_unsigned_requests(client, settings):
    settings.STRIPE_WEBHOOK_SECRET = "whsec_x"
    response = client.post("/billing/stripe/webhook", b'{"id": "evt_1"}', content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_webhook"


def test_the_week_is_named_like_iso_weeks(clock, user):
    account = limits.billing_account_get(user=user)
    assert invoices.invoice_number(account, MONDAY) == f"2026W10-{account.id:05d}"
