from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "llmhub.gateway"
    label = "gateway"

    def ready(self):
        from . import signals

        signals.connect()
