"""Sign-in throttling for /login/ and /admin/login/ with django-axes.

Two counts over a sliding cool-off window (`SIGNIN_COOLOFF` seconds, 15 minutes by default):

- per account (the username typed, whether or not it exists): `SIGNIN_FAILURES_PER_ACCOUNT` (10) failures
  lock that account, from every address, until the window passes;
- per client address, across accounts: `SIGNIN_FAILURES_PER_ADDRESS` (100) failures lock that address, so
  one person mistyping never locks out an office behind one address, and a guesser trying many accounts
  from one address is stopped.

While locked, even the right password is refused. The answer is the sign-in page itself with HTTP 429,
`Retry-After` and a message saying when to retry. The client address is `REMOTE_ADDR`: behind a TLS proxy,
uvicorn sets it from X-Forwarded-For only for the proxies named by `--forwarded-allow-ips` (see the
README's "Running in production"); Django never reads the header itself, so a forged one changes nothing.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from axes.handlers.database import AxesDatabaseHandler
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib import admin
from django.contrib.auth.forms import AuthenticationForm
from django.db.models import Max, Q, Sum
from django.shortcuts import render
from django.utils import timezone


class SignInThrottle(AxesDatabaseHandler):
    """Axes' database handler with two thresholds: axes compares one failure count with one limit
    (`AXES_FAILURE_LIMIT` = failures per account), so the per-address count is scaled to it:
    ⌊address failures × per-account limit / per-address limit⌋ reaches the limit exactly when the address
    has `SIGNIN_FAILURES_PER_ADDRESS` failures."""

    def get_failures(self, request, credentials: dict | None = None) -> int:
        by_account, by_address = (
            attempts.aggregate(n=Sum("failures_since_start"))["n"] or 0
            for attempts in self.get_user_attempts(request, credentials)
        )  # in the order of AXES_LOCKOUT_PARAMETERS: ["username", "ip_address"]
        per_account, per_address = settings.AXES_FAILURE_LIMIT, settings.SIGNIN_FAILURES_PER_ADDRESS
        return max(by_account, by_address * per_account // per_address)


def retry_at(request, username: str | None) -> datetime:
    """When the lock on `username` or the request's address ends: its latest counted failure + the cool-off."""
    latest = AccessAttempt.objects.filter(Q(username=username) | Q(ip_address=request.axes_ip_address)).aggregate(
        t=Max("attempt_time")
    )["t"]
    return (latest or timezone.now()) + timedelta(seconds=settings.SIGNIN_COOLOFF)


def lockout_response(request, *args, **kwargs):
    """The sign-in page (the admin's on /admin/login/) with HTTP 429, `Retry-After` and when to retry."""
    username = request.POST.get("username", "")
    until = retry_at(request, username)
    seconds = max(math.ceil((until - timezone.now()).total_seconds()), 1)
    minutes = math.ceil(seconds / 60)
    message = (
        f"Too many failed sign-ins for this account or from your network. Try again in {minutes} "
        f"minute{'s' if minutes != 1 else ''} (after {until:%H:%M} UTC)."
    )
    form = AuthenticationForm(request, initial={"username": username})
    form.errors["__all__"] = form.error_class([message])
    if getattr(request.resolver_match, "namespace", "") == admin.site.name:
        context = {**admin.site.each_context(request), "title": "Log in", "app_path": request.get_full_path()}
        template = "admin/login.html"
    else:
        context, template = {}, "registration/login.html"
    context.update(form=form, next=request.POST.get("next") or request.GET.get("next", ""))
    response = render(request, template, context, status=429)
    response["Retry-After"] = str(seconds)
    return response
