"""The deployment page polls only its live fragments (status badge, instances, events); the traffic charts
refresh on their own, slower schedule, and not while the tab is hidden."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from llmhub.deployments.models import Deployment
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db

POLLER = re.compile(r'<[^>]*\bhx-get="(?P<url>[^"]+)"[^>]*>', re.S)
EVERY = re.compile(r'hx-trigger="[^"]*\bevery (?P<seconds>\d+)s')


@pytest.fixture
def signed_in(client, user):
    client.force_login(user)
    return client


def pollers(page: str) -> dict[str, tuple[int, str]]:
    """{url: (interval in seconds, tag)} of every element of `page` that polls."""
    found = {}
    for match in POLLER.finditer(page):
        if every := EVERY.search(match.group(0)):
            found[match.group("url")] = (int(every.group("seconds")), match.group(0))
    return found


def chart_queries(queries) -> list[str]:
    return [q["sql"] for q in queries if "gateway_usagerecord" in q["sql"]]


def test_fast_polls_never_run_the_chart_sql(signed_in, user):
    deployment = DeploymentFactory(user=user)
    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    fast = {url: tag for url, (seconds, tag) in pollers(page).items() if seconds < 60}
    assert fast, "the page polls its live fragments"

    for url in fast:
        with CaptureQueriesContext(connection) as queries:
            response = signed_in.get(url, HTTP_HX_REQUEST="true")
        assert response.status_code == 200, url
        assert chart_queries(queries.captured_queries) == [], f"a poll of {url} re-ran the chart SQL"
        assert "<svg" not in response.content.decode()
        assert len(queries.captured_queries) <= 8, [q["sql"] for q in queries.captured_queries]


def test_the_live_fragment_shows_instances_and_events_and_no_whole_page(signed_in, user):
    deployment = DeploymentFactory(user=user)
    deployment.events.create(kind="created", message="on 1 × CPU")
    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    live_url = next(url for url, (seconds, _) in pollers(page).items() if url.endswith("/live"))

    fragment = signed_in.get(live_url, HTTP_HX_REQUEST="true").content.decode()

    assert 'id="live"' in fragment and "on 1 × CPU" in fragment and "No instances yet" in fragment
    assert "<html" not in fragment and "Traffic" not in fragment


def test_charts_refresh_every_minute_only_while_the_tab_is_visible(signed_in, user):
    deployment = DeploymentFactory(user=user)
    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    slow = {url: tag for url, (seconds, tag) in pollers(page).items() if seconds >= 60}

    ((url, tag),) = slow.items()
    assert url.endswith("/charts") and "every 60s" in tag
    assert "[document.visibilityState" in tag and "visibilitychange" in tag
    with CaptureQueriesContext(connection) as queries:
        fragment = signed_in.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert len(chart_queries(queries.captured_queries)) == 1
    assert fragment.count("<svg") == 3 and "<html" not in fragment


def test_live_fragment_stops_polling_once_the_deployment_is_final(signed_in, user):
    deployment = DeploymentFactory(user=user, status=Deployment.Status.FAILED)

    response = signed_in.get(f"/deployments/{deployment.deploy_id}/live", HTTP_HX_REQUEST="true")

    assert response.status_code == 286  # htmx: stop polling


@pytest.mark.parametrize("path", ["live", "charts"])
def test_fragments_of_someone_elses_deployment_do_not_exist(signed_in, other_user, client, path):
    theirs = DeploymentFactory(user=other_user)
    assert signed_in.get(f"/deployments/{theirs.deploy_id}/{path}").status_code == 404
    assert signed_in.post(f"/deployments/{theirs.deploy_id}/{path}").status_code in (404, 405)
    client.logout()
    response = client.get(f"/deployments/{theirs.deploy_id}/{path}")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("path", ["live", "charts"])
def test_fragments_refuse_other_methods(signed_in, user, path):
    deployment = DeploymentFactory(user=user)
    assert signed_in.post(f"/deployments/{deployment.deploy_id}/{path}").status_code == 405


def test_live_fragment_of_a_deployment_deleted_meanwhile_stops_polling(signed_in, user):
    deployment = DeploymentFactory(user=user, status=Deployment.Status.DELETING)
    assert signed_in.get(f"/deployments/{deployment.deploy_id}/live", HTTP_HX_REQUEST="true").status_code == 200

    Deployment.objects.filter(id=deployment.id).update(status=Deployment.Status.DELETED)
    response = signed_in.get(f"/deployments/{deployment.deploy_id}/live", HTTP_HX_REQUEST="true")

    assert response.status_code == 286  # not a 404 that htmx would poll again every 3 s


def test_status_badge_of_a_deployment_deleted_meanwhile_stops_polling(signed_in, user, other_user):
    deployment = DeploymentFactory(user=user, status=Deployment.Status.DELETED)
    theirs = DeploymentFactory(user=other_user, status=Deployment.Status.DELETED)

    assert signed_in.get(f"/deployments/{deployment.deploy_id}/status").status_code == 286
    assert signed_in.get(f"/deployments/{theirs.deploy_id}/status").status_code == 404
    assert signed_in.get(f"/deployments/{theirs.deploy_id}/live").status_code == 404
