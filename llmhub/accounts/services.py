"""Writes for accounts: API tokens."""

import hashlib
import secrets

from django.utils import timezone

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
    return token, secret


def api_token_revoke(*, token: ApiToken) -> None:
    """Revoke `token`; it stops authenticating at once. Revoking twice keeps the first time."""
    ApiToken.objects.filter(id=token.id, revoked_at__isnull=True).update(revoked_at=timezone.now())
