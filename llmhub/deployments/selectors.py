"""Reads for deployments. A user sees only their own deployments: anyone else's do not exist."""

from decimal import Decimal

from django.db.models import QuerySet
from django.http import Http404

from llmhub.accounts.models import User
from llmhub.fleet.models import GpuType

from .models import Deployment

HOURS_PER_MONTH = Decimal(730)  # 8,760 hours a year / 12


def deployments_visible(user: User) -> QuerySet[Deployment]:
    """The user's deployments that are not deleted, newest first."""
    return (
        Deployment.objects.filter(user=user)
        .exclude(status=Deployment.Status.DELETED)
        .select_related("user", "gpu_type")
    )


def model_name_taken(user: User, model_name: str) -> bool:
    """True when one of the user's deployments that is not deleted already has this name."""
    return (
        Deployment.objects.filter(user=user, model_name=model_name).exclude(status=Deployment.Status.DELETED).exists()
    )


def deployment_get(user: User, deploy_id: str, *, include_deleted: bool = False) -> Deployment:
    """The user's deployment `deploy_id`. Raises Http404 when missing, someone else's, or deleted (unless
    `include_deleted`: a page that polls it learns that it is gone)."""
    deployments = Deployment.objects.filter(user=user).select_related("user", "gpu_type")
    if not include_deleted:
        deployments = deployments.exclude(status=Deployment.Status.DELETED)
    deployment = deployments.filter(deploy_id=deploy_id).first()
    if deployment is None:
        raise Http404("No such deployment.")
    return deployment


def model_get(user: User, username: str, model_name: str) -> Deployment:
    """The user's live deployment served as `username/model_name`. Raises Http404 otherwise (also
    when `username` is someone else: their models do not exist for this user)."""
    deployment = None
    if username == user.username:
        deployment = deployments_visible(user).filter(model_name=model_name).first()
    if deployment is None:
        raise Http404("No such model.")
    return deployment


def hourly_cost(gpu_type: GpuType, num_gpus: int, instances: int) -> Decimal:
    """USD per hour for `instances` instances of `num_gpus` GPUs: instances × GPUs × the GPU-hour price."""
    return gpu_type.hourly_price * num_gpus * instances


def cost_estimate(gpu_type: GpuType, num_gpus: int, min_instances: int, max_instances: int) -> dict:
    """{"min": {"hourly", "monthly"}, "max": {…}} in USD; monthly = hourly × 730 h (always-on)."""
    out = {}
    for bound, instances in (("min", min_instances), ("max", max_instances)):
        hourly = hourly_cost(gpu_type, num_gpus, instances)
        out[bound] = {"instances": instances, "hourly": hourly, "monthly": hourly * HOURS_PER_MONTH}
    return out
