"""ASGI entry point: `uvicorn llmhub.asgi:application` serves the dashboard, APIs and gateway.

The gateway's POST endpoints are served by `llmhub.gateway.asgi` without Django's middleware stack.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")
django_application = get_asgi_application()

from llmhub.gateway.asgi import wrap  # noqa: E402 - needs Django set up first

application = wrap(django_application)
