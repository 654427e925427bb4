"""ASGI entry point: `uvicorn llmhub.asgi:application` serves the dashboard, APIs and gateway."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")
application = get_asgi_application()
