"""``manage.py billing_audit``: metered usage recomputed from the run intervals vs what was invoiced."""

import sys
from datetime import datetime

from django.core.management.base import BaseCommand, CommandError

from llmhub.billing.audit import billing_audit


class Command(BaseCommand):
    help = (
        "Recompute GPU-seconds and cost per account and week from the instances' run intervals, compare them "
        "with the invoices up to each account's latest invoice, and list every difference (exit status 1 when "
        "there is any)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--now", help="Audit as of this ISO 8601 moment with a time zone (default: now).")

    def handle(self, *args, **options):
        now = None
        if options.get("now"):
            try:
                now = datetime.fromisoformat(options["now"])
            except ValueError as exc:
                raise CommandError(f"--now: {exc}") from exc
            if now.tzinfo is None:
                raise CommandError("--now needs a time zone, e.g. 2026-03-09T02:00:00+00:00")
        differences = billing_audit(now=now)
        for difference in differences:
            self.stdout.write(str(difference))
        if differences:
            self.stdout.write(f"{len(differences)} differences")
            self.stdout.flush()
            sys.exit(1)
        self.stdout.write("no differences: the invoices match the run intervals")
