"""The deployment page's request log: owner only (404 for anyone else's deployment on every URL), search in
prompts and answers, paging, JSONL download; kept LLMHUB_REQUEST_LOG_DAYS days, purged by a beat task."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from llmhub.gateway.models import RequestLog
from llmhub.gateway.request_log import request_logs_purge
from tests.factories import DeploymentFactory
from workers.schedule import beat_schedule

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock():
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


@pytest.fixture
def signed_in(client, user):
    client.force_login(user)
    return client


def logged(deployment, n, *, at=T0, **fields):
    """`n` log entries of `deployment`, one a minute up to `at` (entry i has prompt "question i")."""
    return RequestLog.objects.bulk_create(
        RequestLog(
            deployment=deployment, created_at=at - timedelta(minutes=n - 1 - i), model=deployment.full_name,
            endpoint="chat/completions", status=200, prompt_tokens=3, completion_tokens=4, latency_ms=120,
            messages=[{"role": "user", "content": f"question {i}"}], prompt=f"user: question {i}",
            **{"response": f"answer number {i}", **fields},
        )
        for i in range(n)
    )  # fmt: skip


def urls(deployment):
    base = f"/deployments/{deployment.deploy_id}"
    return [f"{base}/requests/", f"{base}/requests/?q=question", f"{base}/requests.jsonl"]


def test_the_page_loads_the_section_for_the_owner(signed_in, user):
    deployment = DeploymentFactory(user=user, request_logging=True)

    page = signed_in.get(f"/deployments/{deployment.deploy_id}/").content.decode()

    assert f'hx-get="/deployments/{deployment.deploy_id}/requests/"' in page


def test_entries_newest_first_with_usage(signed_in, user, clock):
    deployment = DeploymentFactory(user=user, request_logging=True)
    logged(deployment, 3)

    section = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/", HTTP_HX_REQUEST="true")

    text = section.content.decode()
    assert section.status_code == 200 and "<html" not in text
    assert text.index("question 2") < text.index("question 1") < text.index("question 0")
    assert "answer number 2" in text and "120 ms" in text and "3 → 4" in text


def test_search_matches_prompts_and_answers_case_blind(signed_in, user, clock):
    deployment = DeploymentFactory(user=user, request_logging=True)
    logged(deployment, 12)

    by_prompt = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?q=QUESTION 11").content.decode()
    by_answer = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?q=number 3").content.decode()
    nothing = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?q=zebra").content.decode()

    assert "question 11" in by_prompt and "question 10" not in by_prompt
    assert "answer number 3" in by_answer and "answer number 4" not in by_answer
    assert "No request matches" in nothing


def test_paging(signed_in, user, clock):
    deployment = DeploymentFactory(user=user, request_logging=True)
    logged(deployment, 45)

    first = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/").content.decode()
    third = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?page=3").content.decode()
    beyond = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?page=99")
    junk = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?page=x")

    assert "question 44" in first and "question 25" in first and "question 24" not in first
    assert "page 1 of 3" in first and "?page=2" in first
    assert "question 4<" in third and "question 0<" in third and "question 5<" not in third
    assert beyond.status_code == 200 and "question 0<" in beyond.content.decode()  # the last page
    assert junk.status_code == 200 and "question 44" in junk.content.decode()


def test_search_keeps_its_terms_in_the_paging_links(signed_in, user, clock):
    deployment = DeploymentFactory(user=user, request_logging=True)
    logged(deployment, 30)

    page = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/?q=question").content.decode()

    assert "?q=question&amp;page=2" in page
    assert f"/deployments/{deployment.deploy_id}/requests.jsonl?q=question" in page


def test_jsonl_download_of_everything_kept_or_of_a_search(signed_in, user, clock):
    deployment = DeploymentFactory(user=user, request_logging=True)
    logged(deployment, 3)

    response = signed_in.get(f"/deployments/{deployment.deploy_id}/requests.jsonl")
    lines = [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]
    searched = signed_in.get(f"/deployments/{deployment.deploy_id}/requests.jsonl?q=number 1")

    assert response.status_code == 200 and response["Content-Type"].startswith("application/jsonl")
    assert f'{deployment.model_name}-requests.jsonl"' in response["Content-Disposition"]
    assert [line["prompt"] for line in lines] == ["user: question 2", "user: question 1", "user: question 0"]
    assert lines[0] == {
        "created_at": "2026-03-04T12:00:00+00:00", "model": deployment.full_name, "endpoint": "chat/completions",
        "stream": False, "status": 200, "prompt_tokens": 3, "completion_tokens": 4, "latency_ms": 120,
        "messages": [{"role": "user", "content": "question 2"}], "prompt": "user: question 2",
        "response": "answer number 2",
    }  # fmt: skip
    assert [json.loads(line)["response"] for line in b"".join(searched.streaming_content).splitlines()] == [
        "answer number 1"
    ]


def test_texts_are_escaped(signed_in, user, clock):
    deployment = DeploymentFactory(user=user, request_logging=True)
    logged(deployment, 1, response="<script>alert(1)</script>")

    text = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/").content.decode()

    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text


def test_off_says_so_and_keeps_showing_what_was_kept(signed_in, user, clock):
    deployment = DeploymentFactory(user=user)
    quiet = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/").content.decode()
    logged(deployment, 1)
    kept = signed_in.get(f"/deployments/{deployment.deploy_id}/requests/").content.decode()

    assert "Request logging is off" in quiet and "off by default" in quiet
    assert "question 0" in kept


def test_someone_elses_logs_do_not_exist(signed_in, other_user, clock):
    theirs = DeploymentFactory(user=other_user, request_logging=True)
    logged(theirs, 2)

    for url in urls(theirs):
        response = signed_in.get(url)
        assert response.status_code == 404, url
        assert b"question" not in response.content


def test_anonymous_is_sent_to_login_and_other_methods_refused(client, signed_in, user):
    deployment = DeploymentFactory(user=user, request_logging=True)
    for url in urls(deployment):
        assert signed_in.post(url).status_code == 405, url
        assert signed_in.delete(url).status_code == 405, url
    client.logout()
    for url in urls(deployment):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url


def test_the_purge_keeps_the_configured_days(settings, user, clock):
    settings.REQUEST_LOG_DAYS = 2
    deployment = DeploymentFactory(user=user, request_logging=True)
    old = logged(deployment, 1, at=T0 - timedelta(days=2, seconds=1))
    fresh = logged(deployment, 1, at=T0 - timedelta(days=2) + timedelta(seconds=1))

    assert request_logs_purge() == 1

    assert list(RequestLog.objects.values_list("id", flat=True)) == [fresh[0].id]
    assert not RequestLog.objects.filter(id=old[0].id).exists()
    clock.shift(timedelta(seconds=2))
    assert request_logs_purge() == 1 and not RequestLog.objects.exists()


def test_the_purge_runs_on_the_beat_schedule():
    tasks = {entry["task"] for entry in beat_schedule().values()}
    assert "workers.tasks.request_logs_purge" in tasks


def test_the_purge_task_is_thin(user, clock, settings):
    from workers.tasks import request_logs_purge as task

    settings.REQUEST_LOG_DAYS = 1
    logged(DeploymentFactory(user=user), 1, at=T0 - timedelta(days=3))

    task.apply()

    assert not RequestLog.objects.exists()
