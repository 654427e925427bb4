"""Billing settings form: monthly spending limit and alerts."""

from decimal import Decimal

from django import forms

from llmhub import outbound

MAX_LIMIT = Decimal("10000000")


class BillingSettingsForm(forms.Form):
    monthly_limit = forms.DecimalField(
        required=False,
        min_value=Decimal("0.01"),
        max_value=MAX_LIMIT,
        decimal_places=2,
        label="Monthly spending limit (USD)",
        help_text="At 100 % your deployments are suspended (scaled to zero) until you raise or remove the "
        "limit, or the next month starts. Leave empty for no limit.",
        widget=forms.NumberInput(attrs={"step": "0.01", "min": "0.01", "placeholder": "no limit"}),
    )
    alert_thresholds = forms.CharField(
        required=False,
        initial="50, 80, 100",
        label="Alert at (% of the limit)",
        help_text="Comma-separated percentages from 1 to 100; each alerts once a month.",
    )
    alert_email = forms.EmailField(
        required=False, label="Alert e-mail", help_text="Empty: your account's e-mail address."
    )
    alert_webhook_url = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        label="Alert webhook URL (optional)",
        help_text="Alerts are POSTed here as JSON, retried with backoff until it answers 2xx.",
    )

    def clean_alert_thresholds(self) -> list[int]:
        raw = self.cleaned_data["alert_thresholds"]
        values = []
        for part in raw.replace(";", ",").split(","):
            part = part.strip().rstrip("%").strip()
            if not part:
                continue
            try:
                value = int(part)
            except ValueError:
                raise forms.ValidationError(f"'{part}' is not a whole percentage (e.g. 50, 80, 100).") from None
            if not 1 <= value <= 100:
                raise forms.ValidationError(f"{value} % is outside 1–100 %.")
            values.append(value)
        if len(set(values)) > 10:
            raise forms.ValidationError("Give at most 10 thresholds.")
        return sorted(set(values))

    def clean_alert_webhook_url(self) -> str:
        url = self.cleaned_data["alert_webhook_url"]
        if url and not url.lower().startswith(("http://", "https://")):
            raise forms.ValidationError("Use an http:// or https:// URL.")
        if url:
            try:
                outbound.url_check(url)  # checked again at every delivery (DNS may change)
            except outbound.OutboundError as exc:
                raise forms.ValidationError(f"This URL cannot receive alerts: {exc}.") from None
        return url
