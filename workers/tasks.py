"""Thin Celery tasks: take ids, call a service."""

from contextlib import contextmanager

from workers.celery import app


@app.task(name="workers.tasks.reconcile_deployment")
def reconcile_deployment(deployment_id: int) -> None:
    """Reconcile one deployment now (enqueued on create, scale and delete)."""
    from llmhub.fleet.reconcile import deployment_reconcile

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


@contextmanager
def _routing_watch():
    """Bump the gateway's routing generation when the wrapped work changed ready instances or statuses."""
    from llmhub.gateway.generation import routing_changed
    from llmhub.gateway.routing import routing_fingerprint

    before = routing_fingerprint()
    yield
    if routing_fingerprint() != before:
        routing_changed()
