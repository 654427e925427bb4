"""Alert webhooks as an attacker would use them: to reach this installation's own network (SSRF), to
hold a worker with a trickling or endless answer, or to bounce the worker elsewhere with a redirect.

Every forbidden target is refused when the URL is saved (a form error naming why) and again when an alert
is sent (a URL saved before, or a name that resolved elsewhere at save time), and nothing connects.
Real HTTP servers on 127.0.0.1 play the endpoints; names resolve through the outbound seam's resolver.
"""

import socket
import time
from datetime import UTC, datetime

import pytest

from llmhub import outbound
from llmhub.billing import alerts, limits
from llmhub.billing.forms import BillingSettingsForm
from llmhub.billing.models import AlertDelivery
from tests.fakes.webhook_server import endpoint_running, tls_pair
from tests.security.support import webhook_delivery

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)
PUBLIC = "93.184.215.14"  # a global unicast address (never connected to by these tests)

FORBIDDEN = [
    "http://127.0.0.1:6379/",  # Redis
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
    "http://10.0.0.1/internal",
    "http://localhost:8000/admin/",
    "http://[::1]:8000/admin/",
    "http://[::ffff:127.0.0.1]:8000/",  # IPv4-mapped IPv6
    "http://0.0.0.0:8000/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # shared address space (carrier-grade NAT)
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://[2002:7f00:1::]/",  # 6to4 around 127.0.0.1
    "http://loopback.example.test:8000/",  # a name that resolves to 127.0.0.1 (resolver below)
]


@pytest.fixture
def names(monkeypatch):
    """Names resolved by the outbound seam: `loopback.example.test` → 127.0.0.1, `public.example.test` → a
    public address, `rebind.example.test` → public at the first look-up and 127.0.0.1 afterwards."""
    lookups = []

    def resolve(host, port):
        lookups.append(host)
        table = {"loopback.example.test": ["127.0.0.1"], "public.example.test": [PUBLIC]}
        if host == "rebind.example.test":
            return [PUBLIC] if lookups.count(host) == 1 else ["127.0.0.1"]
        if host == "mixed.example.test":
            return [PUBLIC, "10.1.2.3"]
        if host in table:
            return table[host]
        return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port)))  # e.g. localhost

    monkeypatch.setattr(outbound, "resolve", resolve)
    return lookups


def settings_form(url):
    return BillingSettingsForm(
        {"monthly_limit": "10", "alert_thresholds": "100", "alert_email": "", "alert_webhook_url": url}
    )


def delivery_to(user, url) -> AlertDelivery:
    return webhook_delivery(user, url, now=NOW)


def deliver(delivery) -> AlertDelivery:
    alerts.alerts_deliver(now=NOW)
    return AlertDelivery.objects.get(id=delivery.id)


@pytest.mark.parametrize("url", FORBIDDEN)
def test_a_forbidden_target_is_refused_when_saved_naming_why(url, names):
    form = settings_form(url)

    assert not form.is_valid()
    message = form.errors["alert_webhook_url"][0]
    assert "address not allowed" in message
    assert any(word in message for word in ("loopback", "private", "link-local", "unspecified", "multicast",
                                             "non-public", "reserved"))  # fmt: skip


@pytest.mark.parametrize("url", FORBIDDEN)
def test_a_forbidden_target_is_refused_when_sent(url, names, user):
    delivery = deliver(delivery_to(user, url))

    assert delivery.status == "pending" and delivery.attempts == 1  # retried later, refused again
    assert delivery.last_error.startswith("address not allowed")
    assert "Error" not in delivery.last_error  # no exception names or internals shown to the user


def test_the_settings_page_shows_the_refusal(client, user):
    client.force_login(user)
    data = {"monthly_limit": "10", "alert_thresholds": "100", "alert_email": "",
            "alert_webhook_url": "http://169.254.169.254/latest/"}  # fmt: skip

    response = client.post("/billing/settings/", data)

    assert response.status_code == 400
    assert "address not allowed" in response.content.decode()
    assert limits.billing_account_get(user=user).alert_webhook_url == ""


def test_nothing_connects_to_a_loopback_listener(names, user):
    with endpoint_running() as endpoint:
        url = f"http://loopback.example.test:{endpoint.port}/hook"
        assert not settings_form(url).is_valid()
        delivery = deliver(delivery_to(user, url))

    assert delivery.last_error.startswith("address not allowed")
    assert endpoint.received == []


def test_a_name_that_resolves_public_when_saved_and_loopback_when_sent_is_refused(names, user):
    with endpoint_running() as endpoint:
        url = f"http://rebind.example.test:{endpoint.port}/hook"
        form = settings_form(url)
        assert form.is_valid(), form.errors  # public at save time
        delivery = deliver(delivery_to(user, url))  # 127.0.0.1 at send time

    assert delivery.last_error.startswith("address not allowed")
    assert endpoint.received == []
    assert names.count("rebind.example.test") == 2  # resolved once per check, never again by the HTTP client


def test_a_name_with_one_internal_address_among_public_ones_is_refused(names):
    assert not settings_form("https://mixed.example.test/hook").is_valid()


@pytest.mark.parametrize(
    "url, why",
    [("ftp://example.com/x", "http"), ("http://example.com:22/", "port 22"), ("http://u:p@example.com/", "password"),
     ("gopher://127.0.0.1:6379/_INFO", "valid URL")],
)  # fmt: skip
def test_other_schemes_ports_and_credentials_are_refused(url, why):
    form = settings_form(url)

    assert not form.is_valid()
    assert why in form.errors["alert_webhook_url"][0]


def test_the_worker_connects_to_the_address_it_checked_keeping_the_host_name(names, user, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # an on-premises operator's setting
    with endpoint_running() as endpoint:
        delivery = deliver(delivery_to(user, f"http://loopback.example.test:{endpoint.port}/hook?x=1"))

    assert delivery.status == "sent"
    [(path, headers)] = endpoint.received
    assert path == "/hook?x=1"
    assert headers["Host"] == f"loopback.example.test:{endpoint.port}"  # the system resolver never saw this name


def test_allow_private_lets_an_operator_use_internal_targets(settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True

    assert settings_form("http://10.0.0.1/hook").is_valid()


def test_a_trickling_endpoint_holds_the_worker_no_longer_than_the_deadline(user, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.BILLING_WEBHOOK_TIMEOUT = 1.0  # short, so the test is quick; production waits 10 s
    with endpoint_running(behaviour="trickle", interval=0.2, duration=20) as endpoint:
        started = time.monotonic()
        delivery = deliver(delivery_to(user, endpoint.url))
        elapsed = time.monotonic() - started

    assert len(endpoint.received) == 1
    assert elapsed < 1.0 + 1.5  # one total deadline, not 10 s per read of a byte every 0.2 s
    assert (delivery.status, delivery.last_error) == ("pending", "timed out")


def test_a_redirect_to_an_internal_target_is_not_followed(user, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # so that the test's first endpoint on 127.0.0.1 is reachable
    with endpoint_running() as admin, endpoint_running(behaviour="redirect") as hook:
        hook.location = f"http://127.0.0.1:{admin.port}/admin/"
        delivery = deliver(delivery_to(user, hook.url))

    assert len(hook.received) == 1 and admin.received == []
    assert (delivery.status, delivery.last_error) == ("pending", "HTTP 307")


def test_a_huge_answer_is_read_only_up_to_the_cap(user, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    with endpoint_running(behaviour="huge") as endpoint:
        started = time.monotonic()
        response = outbound.post_json(endpoint.url, content=b"{}", deadline=10, max_bytes=100_000)
        elapsed = time.monotonic() - started
        delivery = deliver(delivery_to(user, endpoint.url))

    assert response.status == 200 and response.truncated and len(response.body) == 100_000
    assert elapsed < 5
    assert delivery.status == "sent"


def test_errors_shown_to_the_user_are_generic(user, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    with endpoint_running() as endpoint:
        port = endpoint.port
    delivery = deliver(delivery_to(user, f"http://127.0.0.1:{port}/gone"))  # nothing listens any more

    assert delivery.last_error == "connection refused"


@pytest.fixture
def tls(tmp_path, monkeypatch, settings):
    """An https endpoint on 127.0.0.1 with a certificate for `hooks.example.test` from a throwaway CA that
    the outbound seam trusts (in place of the public CAs)."""
    settings.WEBHOOK_ALLOW_PRIVATE = True
    server_context, ca = tls_pair("hooks.example.test", tmp_path)
    monkeypatch.setattr(outbound, "_ssl_context", lambda: outbound.ssl.create_default_context(cafile=ca))
    monkeypatch.setattr(outbound, "resolve", lambda host, port: ["127.0.0.1"])
    with endpoint_running(tls=server_context) as endpoint:
        yield endpoint


def test_https_to_the_pinned_address_verifies_the_certificate_for_the_host_name(tls, user):
    delivery = deliver(delivery_to(user, f"https://hooks.example.test:{tls.port}/hook"))

    assert delivery.status == "sent"
    assert tls.received[0][1]["Host"] == f"hooks.example.test:{tls.port}"


def test_https_refuses_a_certificate_for_another_name(tls, user):
    delivery = deliver(delivery_to(user, f"https://other.example.test:{tls.port}/hook"))

    assert (delivery.status, delivery.last_error) == ("pending", "TLS error: the certificate could not be verified")
    assert tls.received == []
