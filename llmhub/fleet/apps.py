from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "llmhub.fleet"
    label = "fleet"
