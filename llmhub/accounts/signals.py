"""Signals of the accounts app, so that higher layers can react without accounts importing them."""

from django.dispatch import Signal

# Sent (sender = User or ApiToken) after a write that may change who an API token authenticates or that
# user's limits, including `QuerySet.update()`, which sends no post_save. Model saves and deletes are
# covered by Django's own post_save / post_delete.
credentials_changed = Signal()
