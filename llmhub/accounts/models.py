"""Users (a username is the namespace of its model names) and hashed API tokens.

Any write that can change who a token authenticates (save, delete, and `QuerySet.update()` of users and
tokens) sends `signals.credentials_changed`; the gateway listens to drop its cached callers at once.
"""

from django.contrib.auth.models import AbstractUser, UserManager
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from .signals import credentials_changed

namespace_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_-]{0,38}$",
    "Use 1–39 letters, digits, '-' or '_', starting with a letter or digit: "
    "the username is the namespace of your model names (username/model-name).",
)

# First path segments the site uses itself: a namespace named like one would hide its model pages.
RESERVED_NAMESPACES = {
    "admin", "deploy", "deployments", "tokens", "v1", "login", "logout", "static", "metrics", "billing",
}  # fmt: skip


def validate_not_reserved(value: str) -> None:
    if value.lower() in RESERVED_NAMESPACES:
        raise ValidationError(f"'{value}' is reserved by LLMHub; choose another username.")


# Fields whose change alone never affects authentication or limits (written on every sign-in or token use).
BOOKKEEPING_FIELDS = frozenset({"last_login", "last_used_at"})


class CredentialsQuerySet(models.QuerySet):
    """`update()` that tells listeners (the gateway) when it may have changed who is allowed in."""

    def update(self, **kwargs):
        rows = super().update(**kwargs)
        if rows and not set(kwargs) <= BOOKKEEPING_FIELDS:
            credentials_changed.send(sender=self.model)
        return rows

    update.alters_data = True


class LlmhubUserManager(UserManager.from_queryset(CredentialsQuerySet)):
    pass


class User(AbstractUser):
    username = models.CharField(
        "username",
        max_length=39,
        unique=True,
        validators=[namespace_validator, validate_not_reserved],
        error_messages={"unique": "A user with that username already exists."},
    )
    gpu_quota = models.PositiveSmallIntegerField(
        default=4,
        help_text="GPUs this user's live deployments may reserve at most (max instances × GPUs).",
    )
    # Per-user limits; empty means the installation's setting, 0 means no limit.
    rate_limit_per_minute = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Gateway requests per minute, all this user's API tokens together. "
        "Empty: LLMHUB_RATE_LIMIT_PER_MINUTE. 0: no limit.",
    )  # fmt: skip
    max_held_requests = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Requests held at once while a deployment has no ready instance. "
        "Empty: LLMHUB_MAX_HELD_PER_USER. 0: no limit.",
    )  # fmt: skip
    max_api_tokens = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Live API tokens at once. Empty: LLMHUB_MAX_API_TOKENS_PER_USER. 0: no limit.",
    )  # fmt: skip

    objects = LlmhubUserManager()


class ApiToken(models.Model):
    """A Bearer token. Only its SHA-256 hash is stored; the secret is shown once at creation."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="First characters of the secret, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = CredentialsQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"
