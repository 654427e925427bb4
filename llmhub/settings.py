"""LLMHub settings: one django-environ reader, 12-factor.

Every value comes from the environment (or `.llmhub/env`, written by `bin/setup` on first run);
every secret can also be read from a file named by `<NAME>_FILE` (django-environ's FileAwareEnv).
A bad value fails loudly at start-up.
"""

import os
from pathlib import Path

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
    "llmhub.accounts",
    "llmhub.fleet",
    "llmhub.deployments",
    "llmhub.gateway",
    "llmhub.billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
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

# Celery (workers/celery.py reads the CELERY_* names).
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_DEFAULT_QUEUE = env.str("LLMHUB_QUEUE", default="llmhub")
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
# Hugging Face cache the web process reads config.json from for model-fit estimates (None: the
# library's default), and whether it may ask the hub at all.
HF_CACHE_DIR = env.str("LLMHUB_HF_CACHE_DIR", default=None)
HF_HUB_OFFLINE = env.bool("HF_HUB_OFFLINE", default=False)
# Public base URL of the gateway, shown in the dashboard's examples.
PUBLIC_URL = env.str("LLMHUB_PUBLIC_URL", default="http://127.0.0.1:8000")
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
if MAX_BODY_BYTES <= 0 or BODY_READ_TIMEOUT <= 0 or GATEWAY_TOKEN_CACHE_SIZE <= 0:
    raise environ.ImproperlyConfigured(
        "LLMHUB_MAX_BODY_BYTES, LLMHUB_BODY_READ_TIMEOUT and LLMHUB_TOKEN_CACHE_SIZE must be more than 0"
    )
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

# Billing. Stripe collects payment only when STRIPE_SECRET_KEY is set (also STRIPE_SECRET_KEY_FILE);
# without it invoices are still built and shown. Secrets are never logged or shown.
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default="")
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="https://api.stripe.com")
# Seconds between two spending-limit checks: the spend passes a limit by at most this long at the running cost.
BILLING_CHECK_INTERVAL = env.float("LLMHUB_BILLING_CHECK_INTERVAL", default=30.0)
# Seconds after a week's end before its invoices are built (lost hosts are known by then), weeks looked back.
BILLING_INVOICE_GRACE = env.float("LLMHUB_BILLING_INVOICE_GRACE", default=3600.0)
BILLING_INVOICE_WEEKS_BACK = env.int("LLMHUB_BILLING_INVOICE_WEEKS_BACK", default=8)
BILLING_INVOICE_DAYS_UNTIL_DUE = env.int("LLMHUB_BILLING_INVOICE_DAYS_UNTIL_DUE", default=14)
BILLING_WEBHOOK_TIMEOUT = env.float("LLMHUB_BILLING_WEBHOOK_TIMEOUT", default=10.0)
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
