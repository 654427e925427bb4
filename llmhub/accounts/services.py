"""Writes for accounts: API tokens."""

import hashlib
import secrets
from datetime import timedelta

from django.utils import timezone

from llmhub.gateway.generation import routing_changed

from .models import ApiToken, User

TOKEN_PREFIX = "lh-"


def token_hash(secret: str) -> str:
    """SHA-256 hex digest of a token secret (64 chars). Tokens carry 256 random bits, so a fast hash suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


def api_token_create(*, user: User, name: str) -> tuple[ApiToken, str]:
    """Create an API token for `user`.

    Returns `(token, secret)`: the secret (``lh-`` + 43 urlsafe chars) exists only in this return
    value; the database keeps its hash and a short prefix.
    """
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name, prefix=secret[:10], key_hash=token_hash(secret))
    routing_changed()  # the gateway may have cached this secret as unknown
    return token, secret


def api_token_revoke(*, token: ApiToken) -> None:
    """Revoke `token`; it stops authenticating at once. Revoking twice keeps the first time."""
    if ApiToken.objects.filter(id=token.id, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        routing_changed()


# `last_used_at` is written at most once a minute per token, not on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def _live_tokens(secret: str):
    return ApiToken.objects.select_related("user").filter(
        key_hash=token_hash(secret), revoked_at__isnull=True, user__is_active=True
    )


def _stale(token: ApiToken):
    now = timezone.now()
    return token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION, now


def api_token_authenticate(secret: str | None) -> User | None:
    """The active user owning the live (not revoked) API token `secret`, or None.

    Records the token's use (`last_used_at`, to the minute).
    """
    token = _live_tokens(secret).first() if secret else None
    if token is None:
        return None
    stale, now = _stale(token)
    if stale:
        ApiToken.objects.filter(id=token.id).update(last_used_at=now)
    return token.user


async def aapi_token_authenticate(secret: str | None) -> User | None:
    """Async form of `api_token_authenticate`, for the gateway."""
    token = await _live_tokens(secret).afirst() if secret else None
    if token is None:
        return None
    stale, now = _stale(token)
    if stale:
        await ApiToken.objects.filter(id=token.id).aupdate(last_used_at=now)
    return token.user
