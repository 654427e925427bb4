"""Invoices through the real `stripe` SDK against a local fake Stripe server that checks the key, the
idempotency keys and (for webhooks it sends to our live server) Stripe's signature scheme."""

import json
from decimal import Decimal

import pytest
import time_machine

from llmhub.billing import invoices, limits
from llmhub.billing.models import BillingAccount, Invoice, StripeEvent
from tests.billing_support import at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory
from tests.fakes import stripe_server

SECRET = "sk_test_llmhub_fake_0123456789"


@pytest.fixture
def fake_stripe(settings):
    fake, server = stripe_server.start(api_key=SECRET)
    settings.STRIPE_SECRET_KEY = SECRET
    settings.STRIPE_WEBHOOK_SECRET = fake.webhook_secret
    settings.STRIPE_API_BASE = fake.url
    yield fake
    server.shutdown()


@pytest.fixture
def invoice(db, user):
    """Alice's invoice for week 10 of 2026: two deployments, 3.50 + 0.34 USD."""
    with time_machine.travel(at(1), tick=False):
        t4 = GpuTypeFactory(name="T4", hourly_price=Decimal("0.35"))
    host = HostFactory(name="t4", gpu_type=t4, gpu_count=4)
    a = DeploymentFactory(user=user, gpu_type=t4, num_gpus=2, model_name="a")
    b = DeploymentFactory(user=user, gpu_type=t4, num_gpus=1, model_name="b")
    run(a, host, at(2, 10), at(2, 15))
    run(b, host, at(3, 10), at(3, 10, 58, 17))
    account = limits.billing_account_get(user=user)
    built, _ = invoices.invoice_build(account=account, period_start=at(2), now=at(10))
    return built


def test_an_invoice_goes_to_stripe_with_idempotency_keys_and_is_finalized(fake_stripe, invoice, user):
    assert invoices.invoice_push(invoice_id=invoice.id) == "sent"

    posts = [(r.path, r.idempotency_key) for r in fake_stripe.posts()]
    lines = list(invoice.lines.order_by("id"))
    stripe_invoice = next(iter(fake_stripe.invoices.values()))
    assert posts == [
        ("/v1/customers", f"llmhub-customer-{invoice.account.id}"),
        ("/v1/invoices", f"llmhub-invoice-{invoice.id}"),
        ("/v1/invoiceitems", f"llmhub-invoice-line-{lines[0].id}"),
        ("/v1/invoiceitems", f"llmhub-invoice-line-{lines[1].id}"),
        (f"/v1/invoices/{stripe_invoice['id']}/finalize", f"llmhub-invoice-{invoice.id}-finalize"),
    ]
    items = [fake_stripe.posts("/v1/invoiceitems")[i].params for i in (0, 1)]
    assert [(i["amount"], i["currency"]) for i in items] == [("350", "usd"), ("34", "usd")]
    assert items[0]["description"] == "alice/a: 2 × T4, 10.000 GPU-hours at 0.3500 USD per GPU-hour"
    assert stripe_invoice["amount_due"] == 384 == int(invoice.total * 100)
    assert stripe_invoice["metadata"] == {"llmhub_invoice": invoice.number}
    assert fake_stripe.posts("/v1/invoices")[0].params["collection_method"] == "send_invoice"
    invoice.refresh_from_db()
    assert (invoice.stripe_invoice_id, invoice.stripe_status) == (stripe_invoice["id"], "open")
    assert invoice.stripe_hosted_url == f"{fake_stripe.url}/hosted/{stripe_invoice['id']}"
    assert BillingAccount.objects.get(user=user).stripe_customer_id == next(iter(fake_stripe.customers))

    assert invoices.invoice_push(invoice_id=invoice.id) == "already sent"
    assert len(fake_stripe.posts()) == 5


def test_a_push_that_failed_half_way_resumes_without_making_anything_twice(fake_stripe, invoice):
    fake_stripe.fail_next("/v1/invoices/in_", times=3)  # finalize: the SDK retries twice, then gives up

    outcome = invoices.invoice_push(invoice_id=invoice.id)

    assert outcome.startswith("failed: Stripe:")
    invoice.refresh_from_db()
    assert invoice.stripe_error and invoice.stripe_status == "draft"
    # A worker that died before storing Stripe's invoice id retries with the same idempotency key.
    Invoice.objects.filter(id=invoice.id).update(stripe_invoice_id="", stripe_status="")
    invoice.lines.update(stripe_invoice_item_id="")

    assert invoices.invoices_push_pending() == {invoice.id: "sent"}

    assert len(fake_stripe.customers) == 1 and len(fake_stripe.invoices) == 1 and len(fake_stripe.items) == 2
    replays = [r.path for r in fake_stripe.posts() if r.replayed]
    assert replays == ["/v1/invoices", "/v1/invoiceitems", "/v1/invoiceitems"]
    invoice.refresh_from_db()
    assert (invoice.stripe_status, invoice.stripe_error) == ("open", "")


def test_a_reused_idempotency_key_with_other_parameters_is_refused_like_stripe_does(fake_stripe, invoice):
    invoices.invoice_push(invoice_id=invoice.id)
    line = invoice.lines.first()
    from llmhub.billing import stripe

    with pytest.raises(stripe.StripeError, match="same parameters"):
        stripe.invoice_item_create(
            customer_id="cus_x", invoice_id="in_x", amount_cents=1, description="other", period_start=at(2),
            period_end=at(9), line_id=line.id, idempotency_key=f"llmhub-invoice-line-{line.id}",
        )  # fmt: skip


def test_without_stripe_keys_invoices_exist_and_nothing_is_sent(settings, invoice, client, user):
    settings.STRIPE_SECRET_KEY = ""
    assert invoices.invoice_push(invoice_id=invoice.id) == "off"
    assert invoices.invoices_push_pending() == {}
    client.force_login(user)
    assert "Payment collection is off" in client.get(f"/billing/invoices/{invoice.number}/").content.decode()


def test_a_wrong_key_is_an_error_on_the_invoice_not_a_crash(fake_stripe, invoice, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_wrong"

    assert invoices.invoice_push(invoice_id=invoice.id) == "failed: Stripe: Invalid API Key provided."
    invoice.refresh_from_db()
    assert "sk_test" not in invoice.stripe_error


@pytest.mark.django_db(transaction=True)
def test_webhooks_are_verified_recorded_once_and_replays_change_nothing(fake_stripe, invoice, live_server):
    url = f"{live_server.url}/billing/stripe/webhook"
    invoices.invoice_push(invoice_id=invoice.id)
    invoice.refresh_from_db()

    failed = fake_stripe.event("invoice.payment_failed", invoice.stripe_invoice_id, event_id="evt_failed")
    first = fake_stripe.send_event(url, failed)
    invoice.refresh_from_db()
    assert (first.status_code, first.json()["outcome"]) == (200, f"{invoice.number} payment failed")
    assert invoice.status == "payment_failed"

    paid = fake_stripe.event("invoice.paid", invoice.stripe_invoice_id, event_id="evt_paid")
    assert fake_stripe.send_event(url, paid).json()["outcome"] == f"{invoice.number} paid"
    invoice.refresh_from_db()
    paid_at = invoice.paid_at
    assert invoice.status == "paid" and paid_at is not None

    # Replays (Stripe retries deliveries): answered 200, nothing changes.
    replay = fake_stripe.send_event(url, failed)
    assert (replay.status_code, replay.json()["outcome"]) == (200, "already processed")
    assert fake_stripe.send_event(url, paid).json()["outcome"] == "already processed"
    invoice.refresh_from_db()
    assert (invoice.status, invoice.paid_at) == ("paid", paid_at)
    # A late payment failure of an invoice already paid does not undo the payment.
    late = fake_stripe.event("invoice.payment_failed", invoice.stripe_invoice_id, event_id="evt_late")
    assert fake_stripe.send_event(url, late).json()["outcome"] == f"{invoice.number} unchanged"
    assert StripeEvent.objects.count() == 3


@pytest.mark.django_db(transaction=True)
def test_webhooks_with_a_bad_signature_are_refused(fake_stripe, invoice, live_server):
    url = f"{live_server.url}/billing/stripe/webhook"
    invoices.invoice_push(invoice_id=invoice.id)
    invoice.refresh_from_db()
    paid = fake_stripe.event("invoice.paid", invoice.stripe_invoice_id, event_id="evt_forged")
    tampered = json.loads(paid)
    tampered["data"]["object"]["id"] = "in_other"

    answers = [
        fake_stripe.send_event(url, paid, signature=fake_stripe.sign(paid, secret="whsec_wrong")),
        fake_stripe.send_event(url, json.dumps(tampered).encode(), signature=fake_stripe.sign(paid)),
        fake_stripe.send_event(url, paid, signature=fake_stripe.sign(paid, timestamp=1_000_000_000)),  # too old
        fake_stripe.send_event(url, paid, signature="t=1,v1=00"),
    ]

    assert [a.status_code for a in answers] == [400, 400, 400, 400]
    assert all(a.json()["error"]["code"] == "invalid_webhook" for a in answers)
    invoice.refresh_from_db()
    assert invoice.status == "open" and not StripeEvent.objects.exists()
