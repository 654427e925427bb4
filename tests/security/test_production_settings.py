"""Production settings: `LLMHUB_PUBLIC_URL=https://…` turns HTTPS on (secure cookies, HSTS, SSL redirect,
hosts and CSRF origins from the URL) so that Django's own deployment check passes; static files are served
by WhiteNoise through the ASGI application without Django's warning about synchronous iterators."""

import asyncio
import json
import os
import secrets
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_manage(*args, **env):
    environment = {
        **os.environ, "DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_SETTINGS_MODULE": "llmhub.settings",  # production's settings, not the suite's (tests/settings.py)
        **env,
    }  # fmt: skip
    environment.pop("ALLOWED_HOSTS", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_passes_with_an_https_public_url():
    result = run_manage("check", "--deploy", "--fail-level", "WARNING", LLMHUB_PUBLIC_URL="https://llmhub.example.com")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_an_https_public_url_sets_hosts_origins_cookies_and_the_proxy_header():
    show = (
        "import json; from django.conf import settings as s; print(json.dumps({k: getattr(s, k) for k in ["
        "'ALLOWED_HOSTS', 'CSRF_TRUSTED_ORIGINS', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
        "'SECURE_SSL_REDIRECT', 'SECURE_HSTS_SECONDS', 'SECURE_PROXY_SSL_HEADER']}))"
    )
    result = run_manage(
        "shell", "-v", "0", "-c", show, LLMHUB_PUBLIC_URL="https://llmhub.example.com:8443/", LLMHUB_PROXY_SSL_HEADER="X-Forwarded-Proto",
        CSRF_TRUSTED_ORIGINS="https://other.example.com",
    )  # fmt: skip
    values = json.loads(result.stdout)

    assert "llmhub.example.com" in values["ALLOWED_HOSTS"]
    assert values["CSRF_TRUSTED_ORIGINS"] == ["https://other.example.com", "https://llmhub.example.com:8443"]
    assert values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"] and values["SECURE_SSL_REDIRECT"]
    assert values["SECURE_HSTS_SECONDS"] >= 31536000
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def test_a_plain_http_public_url_stays_as_it_was():
    result = run_manage("check", "--deploy", "--fail-level", "WARNING", LLMHUB_PUBLIC_URL="http://127.0.0.1:8000")

    assert result.returncode != 0 and "security.W008" in result.stderr  # HTTPS is not claimed, so not forced


def test_a_bad_public_url_fails_loudly():
    result = run_manage("check", LLMHUB_PUBLIC_URL="llmhub.example.com")

    assert result.returncode != 0 and "LLMHUB_PUBLIC_URL" in result.stderr


@pytest.mark.django_db
def test_static_files_are_served_through_asgi_without_the_sync_iterator_warning():
    from llmhub.asgi import application

    async def get(path, method="GET"):
        scope = {
            "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")], "scheme": "http", "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 5000), "asgi": {"version": "3.0"}, "http_version": "1.1", "root_path": "",
        }  # fmt: skip
        messages, requests = [], [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive():
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # the client stays connected

        async def send(message):
            messages.append(message)

        await application(scope, receive, send)
        return messages

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Django's "StreamingHttpResponse must consume synchronous iterators"
        messages = asyncio.run(get("/static/css/app.css"))
        head = asyncio.run(get("/static/css/app.css", method="HEAD"))

    start = messages[0]
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert start["status"] == 200 and headers["content-type"].startswith("text/css")
    assert "max-age" in headers["cache-control"]  # WhiteNoise's headers
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert body == (ROOT / "static/css/app.css").read_bytes()
    assert head[0]["status"] == 200 and b"".join(m.get("body", b"") for m in head[1:]) == b""
