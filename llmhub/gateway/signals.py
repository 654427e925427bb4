"""Revocation at once: any change to a user or API token, from any path, bumps the routing generation.

Paths covered: model `save()` and `delete()` (dashboard, deploy API, Django admin forms, list edits and
"delete selected", cascades, shell) through post_save / post_delete; `QuerySet.update()` and
`bulk_update()` of users and tokens through `accounts.signals.credentials_changed`. Not covered: raw SQL.
Saves that only record a sign-in or a token's use (`last_login`, `last_used_at`) bump nothing. Every web
process looks at the generation every `routing.CHECK_INTERVAL` seconds and drops its cached callers.

A deployment's `save()` that may change what its cached route holds (`ROUTE_FIELDS`: routing, response
cache, model, adapters, engine options) bumps it too, so that the response cache's serving version and the
routing mode change in every process at once; `QuerySet.update()` of those fields must call
`routing_changed` itself.
"""

from django.db.models.signals import post_delete, post_save

from llmhub.accounts.models import BOOKKEEPING_FIELDS, ApiToken, User
from llmhub.accounts.signals import credentials_changed
from llmhub.deployments.models import Deployment
from llmhub.routing_generation import routing_changed


def _saved(sender, update_fields=None, **kwargs):
    if update_fields and set(update_fields) <= BOOKKEEPING_FIELDS:
        return
    routing_changed()


ROUTE_FIELDS = {"routing", "response_cache_seconds", "task", "hf_repo", "hf_revision", "engine_options",
                "lora_adapters", "model_name"}  # fmt: skip


def _deployment_saved(sender, update_fields=None, **kwargs):
    if update_fields is None or ROUTE_FIELDS & set(update_fields):
        routing_changed()


def _changed(sender, **kwargs):
    routing_changed()


def connect() -> None:
    """Connect the receivers (called once from the gateway app's `ready()`)."""
    for model in (User, ApiToken):
        post_save.connect(_saved, sender=model, dispatch_uid=f"gateway-saved-{model.__name__}")
        post_delete.connect(_changed, sender=model, dispatch_uid=f"gateway-deleted-{model.__name__}")
    post_save.connect(_deployment_saved, sender=Deployment, dispatch_uid="gateway-saved-Deployment")
    credentials_changed.connect(_changed, dispatch_uid="gateway-credentials-changed")
