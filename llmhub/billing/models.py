"""Billing: GPU price history, accounts with spending limits, suspensions, alerts (outbox), weekly invoices.

Money is Decimal USD. Usage is computed from `fleet.Instance` intervals (`started_at`..`stopped_at`), see
`metering.py`; invoices freeze it into lines and the instance intervals behind each line.
"""

from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q

DEFAULT_THRESHOLDS = (50, 80, 100)
CENT = Decimal("0.01")


def default_thresholds() -> list[int]:
    return list(DEFAULT_THRESHOLDS)


class GpuPrice(models.Model):
    """The price of one GPU of a type per hour, from `effective_at` until the next price of that type.

    A price applies from its effective time, never retroactively: prices whose time has come are not
    edited, a change is a new row. Before a type's first price, that first price applies.
    """

    gpu_type = models.ForeignKey("fleet.GpuType", on_delete=models.CASCADE, related_name="prices")
    hourly_price = models.DecimalField(max_digits=10, decimal_places=4, help_text="USD per GPU-hour.")
    effective_at = models.DateTimeField(help_text="From this moment on (UTC) the price applies.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["gpu_type__name", "effective_at"]
        constraints = [models.UniqueConstraint(fields=["gpu_type", "effective_at"], name="gpu_price_unique_time")]

    def __str__(self):
        return f"{self.gpu_type}: {self.hourly_price} USD/GPU-hour from {self.effective_at:%Y-%m-%d %H:%M} UTC"


class BillingAccount(models.Model):
    """A user's billing settings: monthly spending limit, alert thresholds and targets, Stripe customer."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing")
    monthly_limit = models.DecimalField(
        max_digits=12, decimal_places=2, null=True, blank=True, help_text="USD per calendar month (UTC); empty: none."
    )
    alert_thresholds = ArrayField(
        models.PositiveSmallIntegerField(), default=default_thresholds, help_text="Percent of the monthly limit."
    )
    alert_email = models.EmailField(blank=True, help_text="Where alerts go; empty: the user's e-mail address.")
    alert_webhook_url = models.URLField(blank=True, max_length=500, help_text="Optional: alerts are POSTed as JSON.")
    stripe_customer_id = models.CharField(max_length=64, blank=True)
    suspended_at = models.DateTimeField(null=True, blank=True, help_text="Set while the limit holds deployments.")
    operator_hold = models.BooleanField(
        default=False, help_text="Suspended by an operator (admin action), whatever the limit says."
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"billing account of {self.user}"

    @property
    def alert_address(self) -> str:
        return self.alert_email or self.user.email


class Suspension(models.Model):
    """One deployment held by the spending limit, with what to restore when it resumes.

    Billing follows the run intervals: the spend stops when the reconciler has stopped the containers
    (seconds after `suspended_at`), and a container that keeps running (a status set back by hand) is billed.
    """

    account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="suspensions")
    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.CASCADE, related_name="suspensions")
    previous_status = models.CharField(max_length=16)
    previous_fail_reason = models.TextField(blank=True)
    suspended_at = models.DateTimeField()
    resumed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-suspended_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment"], condition=Q(resumed_at__isnull=True), name="suspension_one_open_per_deployment"
            )
        ]


class SpendingAlert(models.Model):
    """A threshold of the monthly limit reached: written once per (account, month, threshold), whatever the
    limit is changed to during the month.

    The unique constraint is what makes concurrent checks alert once. Deliveries (e-mail, webhook) are
    outbox rows; a threshold passed together with a higher one in the same check is recorded but not
    delivered (`superseded`), so a user who sets a limit below this month's spend gets one alert.
    """

    account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="alerts")
    month = models.DateField(help_text="First day of the calendar month (UTC).")
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the limit.")
    limit = models.DecimalField(max_digits=12, decimal_places=2, help_text="USD per month when reached.")
    spent = models.DecimalField(max_digits=12, decimal_places=2, help_text="USD spent this month when reached.")
    superseded = models.BooleanField(default=False)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-threshold"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "month", "threshold"], name="spending_alert_once_per_threshold_month"
            )
        ]

    def __str__(self):
        return f"{self.threshold} % of {self.limit} USD reached ({self.month:%Y-%m})"


class IdleAlert(models.Model):
    """A deployment that ran for its `idle_alert_hours` without a request: one per idle spell.

    A spell starts at the deployment's last request, or when its running instances started if that is later
    (`idle_since`); the unique constraint on (deployment, idle_since) is what makes concurrent checks alert
    once. A new request ends the spell (`ended_at`), as does scaling to zero; the next spell can alert again.
    Deliveries (e-mail, webhook) are `AlertDelivery` outbox rows; the banner shows open alerts.
    """

    account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="idle_alerts")
    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.CASCADE, related_name="idle_alerts")
    idle_since = models.DateTimeField(help_text="Start of the spell: last request or start of the running instances.")
    last_request_at = models.DateTimeField(null=True, blank=True, help_text="Null: never asked anything.")
    instances = models.PositiveSmallIntegerField(help_text="Instances running when raised.")
    cost = models.DecimalField(max_digits=12, decimal_places=2, help_text="USD accrued since the last request.")
    hourly = models.DecimalField(max_digits=12, decimal_places=2, help_text="USD per hour at the scale when raised.")
    created_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True, help_text="A request came, or nothing runs any more.")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "idle_since"], name="idle_alert_once_per_spell"),
        ]

    def __str__(self):
        return self.message

    @property
    def idle_seconds(self) -> float:
        """Seconds without a request when raised (since the start of the running instances when never asked)."""
        return (self.created_at - (self.last_request_at or self.idle_since)).total_seconds()

    @property
    def idle_for(self) -> str:
        """`idle_seconds` in words, e.g. "2 h 30 min"."""
        return hours_minutes(self.idle_seconds)

    @property
    def message(self) -> str:
        """The alert in words (banner, e-mail), e.g. "alice/chat has had no request for 2 h 0 min (since
        2026-03-02 09:30 UTC) while 1 instance runs (2 × H100): 10.00 USD since its last request, 5.00 USD per
        hour."."""
        d = self.deployment
        if self.last_request_at is None:
            quiet = f"no request since it started {self.idle_for} ago"
        else:
            quiet = f"no request for {self.idle_for} (since {self.last_request_at:%Y-%m-%d %H:%M} UTC)"
        runs = f"{self.instances} instance{'s' if self.instances != 1 else ''} run{'s' if self.instances == 1 else ''}"
        return (
            f"{d.full_name} has had {quiet} while {runs} ({d.num_gpus} × {d.gpu_type.name}): "
            f"{self.cost:,.2f} USD since its last request, {self.hourly:,.2f} USD per hour."
        )


def hours_minutes(seconds: float) -> str:
    """A duration as "2 h 5 min", or "31 min" under an hour (whole minutes, rounded down)."""
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


class AlertDelivery(models.Model):
    """Outbox: one alert (a spending alert or an idle alert) to one channel, delivered by a task that records
    every attempt."""

    class Channel(models.TextChoices):
        EMAIL = "email"
        WEBHOOK = "webhook"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        FAILED = "failed"

    alert = models.ForeignKey(SpendingAlert, on_delete=models.CASCADE, related_name="deliveries", null=True, blank=True)
    idle_alert = models.ForeignKey(
        IdleAlert, on_delete=models.CASCADE, related_name="deliveries", null=True, blank=True
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    target = models.CharField(max_length=500, help_text="E-mail address or webhook URL.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["alert", "channel"], name="alert_delivery_once_per_channel"),
            models.UniqueConstraint(fields=["idle_alert", "channel"], name="idle_alert_delivery_once_per_channel"),
            models.CheckConstraint(
                condition=Q(alert__isnull=False, idle_alert__isnull=True)
                | Q(alert__isnull=True, idle_alert__isnull=False),
                name="alert_delivery_one_alert",
            ),
        ]

    @property
    def subject(self) -> "SpendingAlert | IdleAlert":
        """The alert this delivery carries."""
        return self.alert if self.alert_id is not None else self.idle_alert


class Invoice(models.Model):
    """One account's usage in one week (Monday 00:00 to Monday 00:00 UTC)."""

    class Status(models.TextChoices):
        OPEN = "open"
        PAID = "paid"
        PAYMENT_FAILED = "payment_failed"

    account = models.ForeignKey(BillingAccount, on_delete=models.PROTECT, related_name="invoices")
    number = models.CharField(max_length=32, unique=True)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    total = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal(0), help_text="USD.")
    created_at = models.DateTimeField()
    paid_at = models.DateTimeField(null=True, blank=True)
    stripe_invoice_id = models.CharField(max_length=64, blank=True)
    stripe_status = models.CharField(max_length=32, blank=True)
    stripe_hosted_url = models.URLField(blank=True, max_length=500)
    stripe_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-period_start", "-id"]
        constraints = [models.UniqueConstraint(fields=["account", "period_start"], name="invoice_one_per_account_week")]

    def __str__(self):
        return f"invoice {self.number}"


class InvoiceLine(models.Model):
    """A deployment's usage at one rate within one week, rounded once to cents (`amount`).

    A usage line covers the invoice's own week (`week_start` = the invoice's `period_start`). An adjustment
    line covers usage of one instance in an earlier week recorded after that week's invoice (a start or a
    stop the reconciler recorded late): positive GPU-seconds bill time not billed yet, negative ones credit
    time billed that did not run. Its intervals say exactly which seconds (negative `seconds`: credited).
    """

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    week_start = models.DateTimeField(help_text="Monday 00:00 UTC of the week whose usage this line bills.")
    is_adjustment = models.BooleanField(default=False)
    instance = models.ForeignKey(
        "fleet.Instance", on_delete=models.PROTECT, null=True, blank=True, related_name="adjustment_lines",
        help_text="The instance an adjustment line is about.",
    )  # fmt: skip
    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.PROTECT, related_name="invoice_lines")
    deployment_name = models.CharField(max_length=120, help_text="username/model_name when billed.")
    gpu_type_name = models.CharField(max_length=32)
    num_gpus = models.PositiveSmallIntegerField()
    hourly_rate = models.DecimalField(max_digits=10, decimal_places=4, help_text="USD per GPU-hour.")
    gpu_seconds = models.DecimalField(max_digits=20, decimal_places=6, help_text="Σ seconds × GPUs.")
    amount = models.DecimalField(max_digits=12, decimal_places=2, help_text="USD (negative: a credit).")
    stripe_invoice_item_id = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["week_start", "deployment_name", "hourly_rate", "id"]

    @property
    def description(self) -> str:
        """The line in words, e.g. "alice/m: 1 × H100, 2.000 GPU-hours at 2.0000 USD per GPU-hour"; an
        adjustment names its week and instance."""
        text = (
            f"{self.deployment_name}: {self.num_gpus} × {self.gpu_type_name}, "
            f"{self.gpu_hours:.3f} GPU-hours at {self.hourly_rate:.4f} USD per GPU-hour"
        )
        if self.is_adjustment:
            kind = "credit" if self.gpu_seconds < 0 else "late usage"
            text = (
                f"adjustment ({kind}) for the week of {self.week_start:%Y-%m-%d}, instance {self.instance_id}: {text}"
            )
        return text

    @property
    def gpu_hours(self) -> Decimal:
        return self.gpu_seconds / 3600

    @property
    def instance_hours(self) -> Decimal:
        """Hours of instance uptime (GPU-hours ÷ GPUs per instance)."""
        return self.gpu_seconds / 3600 / self.num_gpus


class InvoiceInterval(models.Model):
    """A piece of one instance's uptime behind an invoice line (the trace from money back to containers)."""

    line = models.ForeignKey(InvoiceLine, on_delete=models.CASCADE, related_name="intervals")
    instance = models.ForeignKey("fleet.Instance", on_delete=models.PROTECT, related_name="invoice_intervals")
    host_name = models.CharField(max_length=64, blank=True)
    start = models.DateTimeField()
    end = models.DateTimeField()
    seconds = models.DecimalField(max_digits=16, decimal_places=6)

    class Meta:
        ordering = ["start", "instance_id"]

    @property
    def gpu_hours(self) -> Decimal:
        return self.seconds * self.line.num_gpus / 3600


class BillingFailure(models.Model):
    """One account's error in a billing run (spending check, invoices, alert delivery), kept for operators
    and counted in /metrics as ``llmhub_billing_account_failures_total{job}``; the run went on with the
    other accounts."""

    class Job(models.TextChoices):
        SPENDING_CHECK = "spending_check"
        INVOICES = "invoices"
        ALERTS = "alerts"

    account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="failures")
    job = models.CharField(max_length=32, choices=Job.choices)
    error = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]


class StripeEvent(models.Model):
    """A Stripe webhook event already processed (replays are ignored)."""

    event_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=100)
    invoice = models.ForeignKey(Invoice, on_delete=models.SET_NULL, null=True, blank=True, related_name="events")
    outcome = models.CharField(max_length=200, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-received_at"]
