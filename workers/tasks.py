"""Thin Celery tasks: take ids, call a service."""

from workers.celery import app


@app.task(name="workers.tasks.reconcile_deployment")
def reconcile_deployment(deployment_id: int) -> None:
    """Reconcile one deployment now (enqueued on create, scale and delete)."""
    from llmhub.fleet.reconcile import deployment_reconcile

    deployment_reconcile(deployment_id=deployment_id)


@app.task(name="workers.tasks.reconcile_all")
def reconcile_all() -> None:
    """Reconcile every deployment and sweep orphan containers (beat, every RECONCILE_INTERVAL s)."""
    from llmhub.fleet.reconcile import reconcile_all as run

    run()


@app.task(name="workers.tasks.billing_check")
def billing_check() -> None:
    """Spending limits: alerts, suspension, resumption (beat, every BILLING_CHECK_INTERVAL s); scheduled
    GPU prices coming into force."""
    from llmhub.billing.services import gpu_prices_sync, spending_check_all

    gpu_prices_sync()
    spending_check_all()


@app.task(name="workers.tasks.billing_alerts_deliver")
def billing_alerts_deliver() -> None:
    """Deliver due spending alerts (e-mail, webhook) from the outbox (beat, and when an alert is written)."""
    from llmhub.billing.services import alerts_deliver

    alerts_deliver()


@app.task(name="workers.tasks.billing_invoices")
def billing_invoices() -> None:
    """Build the weekly invoices that are due, then send unsent ones to Stripe (beat, hourly)."""
    from llmhub.billing.services import invoices_build_due, invoices_push_pending

    invoices_build_due()
    invoices_push_pending()


@app.task(name="workers.tasks.billing_invoice_push")
def billing_invoice_push(invoice_id: int) -> None:
    """Send one invoice to Stripe (enqueued when it is built)."""
    from llmhub.billing.services import invoice_push

    invoice_push(invoice_id=invoice_id)
