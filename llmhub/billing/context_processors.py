"""The spending-limit banner on every dashboard page."""

from .selectors import banner_for


def billing_banner(request):
    """``billing_banner``: a Banner (level, message) when a limit threshold is reached, else None."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"billing_banner": None}
    return {"billing_banner": banner_for(user)}
