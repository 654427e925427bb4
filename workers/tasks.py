"""Thin Celery tasks: take ids, call a service."""

from contextlib import contextmanager

from llmhub.queue import RETRY_ON_DATABASE_OUTAGE
from workers.celery import app


@app.task(name="workers.tasks.reconcile_deployment", **RETRY_ON_DATABASE_OUTAGE)
def reconcile_deployment(deployment_id: int) -> None:
    """Reconcile one deployment now (enqueued on create, scale and delete)."""
    from llmhub.fleet.reconcile import deployment_reconcile

    with _routing_watch():
        deployment_reconcile(deployment_id=deployment_id)


@app.task(name="workers.tasks.deployment_adapters_apply", **RETRY_ON_DATABASE_OUTAGE)
def deployment_adapters_apply(deployment_id: int) -> None:
    """Give running instances the deployment's changed LoRA adapters (queued by the deployments hook);
    instances marked for replacement are replaced by reconciling at once."""
    from llmhub.fleet.adapters import instances_adapters_apply
    from llmhub.fleet.reconcile import deployment_reconcile

    if instances_adapters_apply(deployment_id=deployment_id).replaced:
        with _routing_watch():
            deployment_reconcile(deployment_id=deployment_id)


@app.task(name="workers.tasks.reconcile_all")
def reconcile_all() -> None:
    """Reconcile every deployment and sweep orphan containers (beat, every RECONCILE_INTERVAL s)."""
    from llmhub.fleet.reconcile import reconcile_all as run

    with _routing_watch():
        run()


@app.task(name="workers.tasks.autoscale_all")
def autoscale_all() -> None:
    """One autoscaler pass with the gateway's in-flight counts (beat, every AUTOSCALE_INTERVAL s)."""
    from llmhub.deployments.autoscaler import autoscale_all as run
    from llmhub.gateway.load import inflight_totals

    run(inflight=inflight_totals())


@app.task(name="workers.tasks.billing_check")
def billing_check() -> None:
    """Spending limits: alerts, suspension, resumption (beat, every BILLING_CHECK_INTERVAL s); scheduled
    GPU prices coming into force."""
    from llmhub.billing.limits import spending_check_all
    from llmhub.billing.prices import gpu_prices_sync

    gpu_prices_sync()
    spending_check_all()


@app.task(name="workers.tasks.billing_alerts_deliver", **RETRY_ON_DATABASE_OUTAGE)
def billing_alerts_deliver() -> None:
    """Deliver due spending alerts (e-mail, webhook) from the outbox (beat, and when an alert is written)."""
    from llmhub.billing.alerts import alerts_deliver

    alerts_deliver()


@app.task(name="workers.tasks.billing_invoices")
def billing_invoices() -> None:
    """Build the weekly invoices that are due, then send unsent ones to Stripe (beat, hourly)."""
    from llmhub.billing.invoices import invoices_build_due, invoices_push_pending

    invoices_build_due()
    invoices_push_pending()


@app.task(name="workers.tasks.billing_invoice_push", **RETRY_ON_DATABASE_OUTAGE)
def billing_invoice_push(invoice_id: int) -> None:
    """Send one invoice to Stripe (enqueued when it is built)."""
    from llmhub.billing.invoices import invoice_push

    invoice_push(invoice_id=invoice_id)


@app.task(name="workers.tasks.idle_check")
def idle_check() -> None:
    """The idle-cost guard: alert on, or scale to zero, deployments running without requests (beat, every
    LLMHUB_IDLE_CHECK_INTERVAL s)."""
    from llmhub.gateway.idle import idle_check_all

    idle_check_all()


@app.task(name="workers.tasks.request_logs_purge")
def request_logs_purge() -> None:
    """Delete request logs older than LLMHUB_REQUEST_LOG_DAYS days (beat, hourly)."""
    from llmhub.gateway.request_log import request_logs_purge as run

    run()


@app.task(name="workers.tasks.image_pull", **RETRY_ON_DATABASE_OUTAGE)
def image_pull(pull_id: int, attempt: int) -> None:
    """Pull an engine image onto a host, with progress in the events (enqueued by a reconcile)."""
    from llmhub.fleet.services import image_pull_run

    image_pull_run(pull_id=pull_id, attempt=attempt)


@contextmanager
def _routing_watch():
    """Bump the gateway's routing generation when the wrapped work changed ready instances or statuses."""
    from llmhub.gateway.routing import routing_fingerprint
    from llmhub.routing_generation import routing_changed

    before = routing_fingerprint()
    yield
    if routing_fingerprint() != before:
        routing_changed()
