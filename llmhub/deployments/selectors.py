"""Reads for deployments. A user sees only their own deployments: anyone else's do not exist."""

from django.db.models import QuerySet
from django.http import Http404

from llmhub.accounts.models import User

from .models import Deployment


def deployments_visible(user: User) -> QuerySet[Deployment]:
    """The user's deployments that are not deleted, newest first."""
    return (
        Deployment.objects.filter(user=user)
        .exclude(status=Deployment.Status.DELETED)
        .select_related("user", "gpu_type")
    )


def deployment_get(user: User, deploy_id: str) -> Deployment:
    """The user's deployment `deploy_id`. Raises Http404 when missing, deleted or someone else's."""
    deployment = deployments_visible(user).filter(deploy_id=deploy_id).first()
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
