from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "llmhub.gateway"
    label = "gateway"
