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
