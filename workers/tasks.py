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


@app.task(name="workers.tasks.image_pull")
def image_pull(pull_id: int, attempt: int) -> None:
    """Pull an engine image onto a host, with progress in the events (enqueued by a reconcile)."""
    from llmhub.fleet.services import image_pull_run

    image_pull_run(pull_id=pull_id, attempt=attempt)
