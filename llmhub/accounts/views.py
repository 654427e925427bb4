"""Dashboard pages for accounts: API tokens (server-rendered, django-htmx)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods

from . import selectors, services
from .forms import ApiTokenForm


@login_required
@never_cache
@require_http_methods(["GET", "POST"])
def token_list(request):
    """The user's live tokens and the create form.

    A valid POST creates a token and renders this page directly with the secret in the context: it is
    shown exactly once, never put in a URL, the session or a log (no redirect, so no stored message).
    """
    form = ApiTokenForm(request.POST or None)
    new_token = secret = None
    if request.method == "POST" and form.is_valid():
        try:
            new_token, secret = services.api_token_create(user=request.user, name=form.cleaned_data["name"])
            form = ApiTokenForm()
        except ValidationError as exc:  # past the token cap
            form.add_error(None, exc)
    context = {
        "tokens": selectors.api_tokens_live(request.user),
        "form": form,
        "new_token": new_token,
        "secret": secret,
    }
    return render(request, "accounts/tokens.html", context, status=400 if form.errors else 200)


@login_required
@require_http_methods(["DELETE", "POST"])
def token_revoke(request, token_id):
    """Trash icon: revoke after confirm. htmx gets the row removed in place + an OOB message.

    Someone else's (or an already revoked) token is a 404.
    """
    token = get_object_or_404(selectors.api_tokens_live(request.user), id=token_id)
    services.api_token_revoke(token=token)
    messages.success(request, f"Revoked “{token.name}” ({token.prefix}…). Requests using it are refused from now on.")
    if request.htmx:
        return render(request, "base.html#messages-oob")
    return redirect("accounts:tokens")
