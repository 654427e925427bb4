"""Writes for accounts: API tokens."""

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from .models import ApiToken, User

TOKEN_PREFIX = "lh-"


def token_hash(secret: str) -> str:
    """SHA-256 hex digest of a token secret (64 chars). Tokens carry 256 random bits, so a fast hash suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


def api_token_limit(user: User) -> int:
    """Live API tokens `user` may have at once: their own `max_api_tokens`, else
    MAX_API_TOKENS_PER_USER (0: no limit)."""
    return settings.MAX_API_TOKENS_PER_USER if user.max_api_tokens is None else user.max_api_tokens


def api_token_create(*, user: User, name: str) -> tuple[ApiToken, str]:
    """Create an API token for `user`.

    Returns `(token, secret)`: the secret (``lh-`` + 43 urlsafe chars) exists only in this return
    value; the database keeps its hash and a short prefix. Raises ValidationError (on ``name``) when the
    user already has `api_token_limit(user)` live tokens; concurrent creations are serialised on the
    user's row so the cap holds. The gateway hears of the new token through post_save.
    """
    with transaction.atomic():
        User.objects.select_for_update().filter(id=user.id).first()
        limit = api_token_limit(user)
        if limit and ApiToken.objects.filter(user=user, revoked_at__isnull=True).count() >= limit:
            raise ValidationError(
                {"name": f"You have at most {limit} API tokens at once; revoke one you no longer use first."}
            )
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = ApiToken.objects.create(user=user, name=name, prefix=secret[:10], key_hash=token_hash(secret))
    return token, secret


def api_token_revoke(*, token: ApiToken) -> None:
    """Revoke `token`; it stops authenticating at once (the update sends `credentials_changed`, which the
    gateway listens to). Revoking twice keeps the first time."""
    ApiToken.objects.filter(id=token.id, revoked_at__isnull=True).update(revoked_at=timezone.now())


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
