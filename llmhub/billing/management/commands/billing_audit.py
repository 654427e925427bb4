"""``manage.py billing_audit``: metered usage recomputed from the run intervals vs what was invoiced."""

import sys

from django.core.management.base import BaseCommand

from llmhub.billing.audit import billing_audit


class Command(BaseCommand):
    help = (
        "Recompute GPU-seconds and cost per account and week from the instances' run intervals, compare them "
        "with the invoices up to each account's latest invoice, and list every difference (exit status 1 when "
        "there is any)."
    )

    def handle(self, *args, **options):
        differences = billing_audit()
        for difference in differences:
            self.stdout.write(str(difference))
        if differences:
            self.stdout.write(f"{len(differences)} differences")
            self.stdout.flush()
            sys.exit(1)
        self.stdout.write("no differences: the invoices match the run intervals")
