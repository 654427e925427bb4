"""Template context shared by every dashboard page."""

from django.conf import settings


def gateway(request):
    """Expose the gateway's public base URL (e.g. ``http://127.0.0.1:8000``) as ``PUBLIC_URL``."""
    return {"PUBLIC_URL": settings.PUBLIC_URL.rstrip("/")}
