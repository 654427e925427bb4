from django.apps import AppConfig


class DeploymentsConfig(AppConfig):
    name = "llmhub.deployments"
    label = "deployments"
