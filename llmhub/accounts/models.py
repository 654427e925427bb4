"""Users (a username is the namespace of its model names) and hashed API tokens."""

from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

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


class ApiToken(models.Model):
    """A Bearer token. Only its SHA-256 hash is stored; the secret is shown once at creation."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="First characters of the secret, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"
