from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "llmhub.billing"
    label = "billing"

    def ready(self):
        from . import signals  # noqa: F401  (GPU type price changes become price history)
        from .failures import register

        register()  # llmhub_billing_account_failures_total in /metrics
