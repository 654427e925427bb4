"""The routing generation: a Redis counter every gateway process watches to drop its cached routes.

On the ground floor (imports no app) so that any layer can call `routing_changed`; the gateway reads it.
"""

import redis
from django.conf import settings
from django.db import transaction

GENERATION_KEY = f"{settings.REDIS_KEY_PREFIX}routing:generation"


def routing_changed() -> None:
    """Tell every gateway process to reload its routing tables (once the current transaction commits).

    Call after anything a request's routing depends on changes: tokens created or revoked,
    deployments created, scaled, deleted or changing status, instances becoming ready or stopping.
    """
    # robust: with Redis down the change still commits; cached routes then expire after routing.TTL.
    transaction.on_commit(lambda: redis.Redis.from_url(settings.REDIS_URL).incr(GENERATION_KEY), robust=True)
