"""`manage.py token_create USERNAME [--name NAME]`: create an API token and print its secret.

For installations run without a browser at hand (Docker Compose, scripts): the secret is written to
stdout alone, once, as the dashboard's `/tokens/` page shows it once; the database keeps its hash.
"""

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from llmhub.accounts.models import User
from llmhub.accounts.services import api_token_create


class Command(BaseCommand):
    help = "Create an API token for a user and print its secret (shown only this once)."

    def add_arguments(self, parser):
        parser.add_argument("username", help="the user the token acts for")
        parser.add_argument("--name", default="cli", help="a label shown on the user's /tokens/ page (default: cli)")

    def handle(self, *args, username, name, **options):
        if not name.strip() or len(name) > 100:
            raise CommandError("--name: give a label of 1 to 100 characters.")
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user '{username}'. Create one first: manage.py createsuperuser, or the admin.")
        if not user.is_active:
            raise CommandError(f"User '{username}' is inactive; activate it in the admin first.")
        try:
            _, secret = api_token_create(user=user, name=name)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        self.stdout.write(secret)
