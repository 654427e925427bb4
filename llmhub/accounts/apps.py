from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "llmhub.accounts"
    label = "accounts"
