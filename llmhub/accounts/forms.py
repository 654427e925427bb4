"""Validation for the API tokens page."""

from django import forms


class ApiTokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        help_text="What uses this token, e.g. 'laptop' or 'CI'. Only you see it.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "placeholder": "e.g. laptop"}),
    )
