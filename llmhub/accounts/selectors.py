"""Reads for accounts: the Bearer secret of a request; a user's live tokens."""

from django.db.models import QuerySet

from .models import ApiToken, User


def bearer_secret(authorization: str | None) -> str | None:
    """The secret of an ``Authorization: Bearer <secret>`` header value, or None when absent/malformed."""
    if not authorization:
        return None
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    return secret.strip()


def api_tokens_live(user: User) -> QuerySet[ApiToken]:
    """The user's API tokens that are not revoked, newest first. Anyone else's tokens are never included."""
    return ApiToken.objects.filter(user=user, revoked_at__isnull=True).order_by("-created_at", "-id")


async def aapi_token_owner(key_hash: str) -> User | None:
    """The active user owning the live API token whose SHA-256 hash is `key_hash`, or None (no use recorded)."""
    token = await (
        ApiToken.objects.select_related("user")
        .filter(key_hash=key_hash, revoked_at__isnull=True, user__is_active=True)
        .afirst()
    )
    return token.user if token else None
