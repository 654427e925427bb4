"""Reads for accounts: who a Bearer token belongs to; a user's live tokens."""

from django.db.models import QuerySet

from .models import ApiToken, User
from .services import token_hash


def bearer_secret(authorization: str | None) -> str | None:
    """The secret of an ``Authorization: Bearer <secret>`` header value, or None when absent/malformed."""
    if not authorization:
        return None
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    return secret.strip()


def _live_tokens(secret: str):
    return ApiToken.objects.select_related("user").filter(
        key_hash=token_hash(secret), revoked_at__isnull=True, user__is_active=True
    )


def user_for_token(secret: str | None) -> User | None:
    """The active user owning the live (not revoked) API token `secret`, or None."""
    token = _live_tokens(secret).first() if secret else None
    return token.user if token else None


async def auser_for_token(secret: str | None) -> User | None:
    """Async form of `user_for_token`, for the gateway."""
    token = await _live_tokens(secret).afirst() if secret else None
    return token.user if token else None


def api_tokens_live(user: User) -> QuerySet[ApiToken]:
    """The user's API tokens that are not revoked, newest first. Anyone else's tokens are never included."""
    return ApiToken.objects.filter(user=user, revoked_at__isnull=True).order_by("-created_at", "-id")
