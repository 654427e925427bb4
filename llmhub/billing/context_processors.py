"""The billing banners on every dashboard page: the spending limit's, and one per idle deployment."""

from django.utils.functional import SimpleLazyObject

from .selectors import banner_for, idle_alerts_open


def billing_banner(request):
    """``billing_banner``: a Banner (level, message) when a limit threshold is reached, else None;
    ``idle_alerts``: the open idle alerts (each with a "scale to zero" button). Both are read only when a
    template shows them, so htmx fragments (polled every few seconds) make no query for them."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"billing_banner": None, "idle_alerts": []}
    return {
        "billing_banner": SimpleLazyObject(lambda: banner_for(user)),
        "idle_alerts": SimpleLazyObject(lambda: idle_alerts_open(user)),
    }
