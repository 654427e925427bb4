"""LLMHub settings: one django-environ reader, 12-factor.

Every value comes from the environment (or `.llmhub/env`, written by `bin/setup` on first run);
every secret can also be read from a file named by `<NAME>_FILE` (django-environ's FileAwareEnv).
A bad value fails loudly at start-up.
"""

import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("LLMHUB_STATE_DIR", BASE_DIR / ".llmhub"))  # secrets, demo facts, logs

env = environ.FileAwareEnv(
    DEBUG=(bool, False),
    ALLOWED_HOSTS=(list, ["localhost", "127.0.0.1", "[::1]"]),
)
if (STATE_DIR / "env").exists():
    environ.Env.read_env(STATE_DIR / "env", overwrite=False)

SECRET_KEY = env.str("SECRET_KEY")
DEBUG = env("DEBUG")
ALLOWED_HOSTS = env("ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# Public base URL of the site (dashboard, APIs, gateway), shown in the dashboard's examples. Its host is
# added to ALLOWED_HOSTS and its origin to CSRF_TRUSTED_ORIGINS. An https:// URL turns HTTPS on: secure
# cookies, HSTS, redirects from http:// (README, "Running in production").
PUBLIC_URL = env.str("LLMHUB_PUBLIC_URL", default="http://127.0.0.1:8000")
_public = urlsplit(PUBLIC_URL)
if _public.scheme not in ("http", "https") or not _public.hostname:
    raise environ.ImproperlyConfigured(f"LLMHUB_PUBLIC_URL must be an http:// or https:// URL, not {PUBLIC_URL!r}")
ALLOWED_HOSTS = list(dict.fromkeys([*ALLOWED_HOSTS, _public.hostname]))
CSRF_TRUSTED_ORIGINS = list(dict.fromkeys([*CSRF_TRUSTED_ORIGINS, f"{_public.scheme}://{_public.netloc}"]))
if _public.scheme == "https":
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = env.int("LLMHUB_HSTS_SECONDS", default=31_536_000)  # a year
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("LLMHUB_HSTS_INCLUDE_SUBDOMAINS", default=True)
    # Preloading is a request to browser vendors that only the domain's owner can make: off unless asked
    # for; Django's reminder about it (security.W021) is silenced while it is off.
    SECURE_HSTS_PRELOAD = env.bool("LLMHUB_HSTS_PRELOAD", default=False)
    if not SECURE_HSTS_PRELOAD:
        SILENCED_SYSTEM_CHECKS = ["security.W021"]
# Behind a TLS-terminating proxy: the header (e.g. X-Forwarded-Proto) through which the proxy says the
# client used https. Set it only when the proxy always sets (overwrites) that header.
if _proxy_header := env.str("LLMHUB_PROXY_SSL_HEADER", default=""):
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https")

# Fernet key (urlsafe base64, 32 bytes) that encrypts Hugging Face tokens at rest.
ENCRYPTION_KEY = env.str("LLMHUB_ENCRYPTION_KEY")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django.contrib.postgres",
    "django_htmx",
    "template_partials",
    "ninja",  # the deploy API's docs page (/deploy/docs) from its own static files, no CDN
    "llmhub.accounts",
    "llmhub.fleet",
    "llmhub.deployments",
    "llmhub.gateway",
    "llmhub.billing",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "llmhub.staticfiles.StaticFilesMiddleware",  # WhiteNoise, asynchronous under ASGI
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "llmhub.unavailable.DatabaseUnavailableMiddleware",  # a database outage is a 503, not a 500
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks: turns a lockout into the 429 page
]

ROOT_URLCONF = "llmhub.urls"
ASGI_APPLICATION = "llmhub.asgi.application"
WSGI_APPLICATION = "llmhub.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "llmhub.context_processors.gateway",
                "llmhub.billing.context_processors.billing_banner",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://llmhub:llmhub@127.0.0.1:5432/llmhub"),
}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=0)
# Seconds to wait for PostgreSQL to accept a connection: a host that does not answer would otherwise hold the
# web process's one database thread for the system's TCP timeout (minutes), and the gateway with it.
DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", env.int("DB_CONNECT_TIMEOUT", default=5))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "llmhub",
    },
}

AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "deployments:list"
LOGOUT_REDIRECT_URL = "login"
# Sign-in throttling (django-axes, llmhub/accounts/throttle.py): failures per account and per client address
# within a sliding cool-off window; past either, sign-in is refused (HTTP 429) until the window passes.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
SIGNIN_FAILURES_PER_ADDRESS = env.int("LLMHUB_SIGNIN_FAILURES_PER_ADDRESS", default=100)
SIGNIN_COOLOFF = env.int("LLMHUB_SIGNIN_COOLOFF", default=900)  # seconds
AXES_FAILURE_LIMIT = env.int("LLMHUB_SIGNIN_FAILURES_PER_ACCOUNT", default=10)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_HANDLER = "llmhub.accounts.throttle.SignInThrottle"
AXES_COOLOFF_TIME = timedelta(seconds=SIGNIN_COOLOFF)
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False  # the retry time shown holds
AXES_RESET_ON_SUCCESS = False  # a success must not reset the address's count (one's own account would)
AXES_LOCKOUT_CALLABLE = "llmhub.accounts.throttle.lockout_response"
AXES_VERBOSE = False
if min(AXES_FAILURE_LIMIT, SIGNIN_FAILURES_PER_ADDRESS, SIGNIN_COOLOFF) < 1:
    raise environ.ImproperlyConfigured("LLMHUB_SIGNIN_* settings must be at least 1")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Files are served by WhiteNoise straight from the finders (no collectstatic step).
WHITENOISE_USE_FINDERS = True

# Celery (the app in llmhub/queue.py reads the CELERY_* names).
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_DEFAULT_QUEUE = env.str("LLMHUB_QUEUE", default="llmhub")
# Deliveries to user-supplied URLs (alert webhooks, and alert e-mail) run on their own queue, consumed by a
# worker process of their own, so a slow endpoint never delays reconcile (routing: llmhub/queue.py).
OUTBOUND_QUEUE = f"{CELERY_TASK_DEFAULT_QUEUE}-outbound"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Seconds between two reconcile passes over every deployment (beat).
RECONCILE_INTERVAL = env.float("LLMHUB_RECONCILE_INTERVAL", default=3.0)
# Names this installation's containers (`<prefix>-<instance id>`, label llmhub.installation), so that
# several installations (or a test run) can share a Docker Engine without touching each other's.
CONTAINER_PREFIX = env.str("LLMHUB_CONTAINER_PREFIX", default="llmhub")
# Prefix of this installation's Redis keys (gateway counters, routing generation), for the same reason.
REDIS_KEY_PREFIX = f"{CONTAINER_PREFIX}:"
# Restarts of a crashed instance before its deployment is marked failed.
INSTANCE_MAX_RESTARTS = env.int("LLMHUB_INSTANCE_MAX_RESTARTS", default=3)
# Seconds a host's engine may stay silent before the host is unreachable and its instances are lost
# (billed until its last heartbeat) and replaced on other hosts.
HOST_UNREACHABLE_GRACE = env.float("LLMHUB_HOST_UNREACHABLE_GRACE", default=60.0)
# Seconds an instance may take from container start to a healthy engine before it counts as crashed.
INSTANCE_START_TIMEOUT = env.float("LLMHUB_INSTANCE_START_TIMEOUT", default=900.0)
# Engine containers: processes + threads each may run (vLLM CPU on 2 cores runs about 72), and Linux
# capabilities given back after dropping all (none needed by vLLM 0.32 on CPU; comma-separated, e.g. SYS_NICE).
ENGINE_PIDS_LIMIT = env.int("LLMHUB_ENGINE_PIDS_LIMIT", default=8192)
ENGINE_CAP_ADD = tuple(c.strip().upper() for c in env.list("LLMHUB_ENGINE_CAP_ADD", default=[]) if c.strip())
# Hugging Face cache the web process reads config.json from for model-fit estimates (None: the
# library's default), and whether it may ask the hub at all.
HF_CACHE_DIR = env.str("LLMHUB_HF_CACHE_DIR", default=None)
HF_HUB_OFFLINE = env.bool("HF_HUB_OFFLINE", default=False)
# Requests per minute per user at the gateway, all their API tokens together (0: no limit). Set far above
# what one user's traffic through the gateway reaches (README, "Limits per user"); a user's own value in the
# admin (User.rate_limit_per_minute) overrides it.
GATEWAY_RATE_LIMIT_PER_MINUTE = env.int("LLMHUB_RATE_LIMIT_PER_MINUTE", default=60000)
# Requests one user may have held at once, over all web processes, while their deployment has no ready
# instance (0: no limit; User.max_held_requests overrides it). Past it: 429 with Retry-After.
GATEWAY_MAX_HELD_PER_USER = env.int("LLMHUB_MAX_HELD_PER_USER", default=64)
# API tokens one user may have live (not revoked) at once (0: no limit; User.max_api_tokens overrides it).
MAX_API_TOKENS_PER_USER = env.int("LLMHUB_MAX_API_TOKENS_PER_USER", default=50)
# Largest request body (bytes) the web process reads, on every path (gateway, deploy API, dashboard): past it
# 413, refused from Content-Length before reading, or as soon as a chunked body passes it.
MAX_BODY_BYTES = env.int("LLMHUB_MAX_BODY_BYTES", default=16 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_BODY_BYTES  # Django's own check of request.body agrees with the cap
# Seconds a request body may take to arrive in full; a slower one gets 408.
BODY_READ_TIMEOUT = env.float("LLMHUB_BODY_READ_TIMEOUT", default=30.0)
# Bearer values each gateway process remembers (valid ones and unknown ones, each in an LRU of this size).
GATEWAY_TOKEN_CACHE_SIZE = env.int("LLMHUB_TOKEN_CACHE_SIZE", default=10000)
# Seconds a gateway process serves a cached caller (API token) or route without asking PostgreSQL again (a
# change bumps the routing generation and reaches every process sooner); while PostgreSQL is down, entries are
# served past it (README, "Outages").
GATEWAY_ROUTE_TTL = env.float("LLMHUB_ROUTE_TTL", default=30.0)
if MAX_BODY_BYTES <= 0 or BODY_READ_TIMEOUT <= 0 or GATEWAY_TOKEN_CACHE_SIZE <= 0 or GATEWAY_ROUTE_TTL <= 0:
    raise environ.ImproperlyConfigured(
        "LLMHUB_MAX_BODY_BYTES, LLMHUB_BODY_READ_TIMEOUT, LLMHUB_TOKEN_CACHE_SIZE and LLMHUB_ROUTE_TTL must be "
        "more than 0"
    )
# Web server processes (`python -m llmhub.web`: bin/up, Compose): one per core unless set.
_web_processes = env.str("LLMHUB_WEB_PROCESSES", default="").strip()  # empty (Compose's default): one per core
if _web_processes and (not _web_processes.isdigit() or int(_web_processes) < 1):
    raise environ.ImproperlyConfigured(
        f"LLMHUB_WEB_PROCESSES must be a whole number of 1 or more, not {_web_processes!r}"
    )
WEB_PROCESSES = int(_web_processes) if _web_processes else os.cpu_count() or 1
# Seconds a request to a deployment with no ready instance (e.g. scaled to zero) is held before a 503.
GATEWAY_HOLD_TIMEOUT = env.float("LLMHUB_HOLD_TIMEOUT", default=600.0)
# Seconds between SSE keepalive comments while a stream waits for its first token.
GATEWAY_KEEPALIVE_INTERVAL = env.float("LLMHUB_KEEPALIVE_INTERVAL", default=10.0)
# Bearer token that GET /metrics requires (unset: /metrics answers 404).
METRICS_TOKEN = env.str("LLMHUB_METRICS_TOKEN", default="")
# Seconds between two autoscaler passes (beat).
AUTOSCALE_INTERVAL = env.float("LLMHUB_AUTOSCALE_INTERVAL", default=2.0)
# Seconds the gateway waits for an engine's response headers (the body streams without a limit).
GATEWAY_UPSTREAM_TIMEOUT = env.float("LLMHUB_GATEWAY_UPSTREAM_TIMEOUT", default=300.0)
# Days a deployment's request logs (prompts and answers, when its owner turned logging on) are kept.
REQUEST_LOG_DAYS = env.int("LLMHUB_REQUEST_LOG_DAYS", default=7)
if REQUEST_LOG_DAYS < 1:
    raise environ.ImproperlyConfigured("LLMHUB_REQUEST_LOG_DAYS must be at least 1 (days)")
# Seconds between two checks for idle deployments (beat; alerts after `idle_alert_hours`, stops after
# `idle_stop_hours` without a request).
IDLE_CHECK_INTERVAL = env.float("LLMHUB_IDLE_CHECK_INTERVAL", default=300.0)
if IDLE_CHECK_INTERVAL <= 0:
    raise environ.ImproperlyConfigured("LLMHUB_IDLE_CHECK_INTERVAL must be more than 0 seconds")

# Billing. Stripe collects payment only when STRIPE_SECRET_KEY is set (also STRIPE_SECRET_KEY_FILE);
# without it invoices are still built and shown. Secrets are never logged or shown.
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default="")
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="https://api.stripe.com")
# Seconds between two spending-limit checks: the spend passes a limit by at most this long at the running cost.
BILLING_CHECK_INTERVAL = env.float("LLMHUB_BILLING_CHECK_INTERVAL", default=30.0)
# Seconds after a week's end before its invoices are built (lost hosts are known by then).
BILLING_INVOICE_GRACE = env.float("LLMHUB_BILLING_INVOICE_GRACE", default=3600.0)
BILLING_INVOICE_DAYS_UNTIL_DUE = env.int("LLMHUB_BILLING_INVOICE_DAYS_UNTIL_DUE", default=14)
# Seconds one alert webhook delivery may take in all (resolve, connect, send, answer): a total deadline.
BILLING_WEBHOOK_TIMEOUT = env.float("LLMHUB_BILLING_WEBHOOK_TIMEOUT", default=10.0)
# Webhooks (llmhub/outbound.py) refuse loopback, private, link-local and other internal addresses unless an
# on-premises operator allows them here.
WEBHOOK_ALLOW_PRIVATE = env.bool("LLMHUB_WEBHOOK_ALLOW_PRIVATE", default=False)
if BILLING_CHECK_INTERVAL <= 0:
    raise environ.ImproperlyConfigured("LLMHUB_BILLING_CHECK_INTERVAL must be more than 0 seconds")
# Alert e-mail through Django's mail: EMAIL_URL such as smtp+tls://user:password@smtp.example.com:587
# (also EMAIL_URL_FILE); tests use Django's locmem backend.
vars().update(env.email_url("EMAIL_URL", default="smtp://localhost:25"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="LLMHub <billing@localhost>")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "docker": {"level": "WARNING"}},
}
