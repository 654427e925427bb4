"""Outages of the control plane, for real: a web process (uvicorn, the platform's own command) reaches
PostgreSQL and Redis through TCP proxies that the tests cut and restore. Requests during an outage are
answered, and their usage is recorded once the database is back, exactly once."""

import os
import signal
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from django.conf import settings
from django.db import connection
from django.test import Client

from llmhub import processes
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance
from llmhub.gateway.models import UsageRecord
from llmhub.gateway.usage_buffer import PENDING_KEY
from tests.factories import DeploymentFactory, HostFactory, UserFactory, token_for
from tests.outage import TcpProxy, engine_server
from tests.stack import free_port, wait_for

# No Docker needed: bin/test runs these in its "others" lane, which is otherwise shorter.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.lane("others")]

METRICS_TOKEN = "metrics-secret-for-outage-tests"
ROUTE_TTL = 1.0  # seconds the web process caches a caller and a route (LLMHUB_ROUTE_TTL; 30 by default)


class Web:
    """One web process whose DATABASE_URL and REDIS_URL go through `pg` and `redis` (TcpProxy)."""

    def __init__(self, log_dir, pg: TcpProxy, rd: TcpProxy):
        db = connection.settings_dict
        redis_db = urlsplit(settings.REDIS_URL).path or "/0"
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@127.0.0.1:{pg.port}/{db['NAME']}",
            "REDIS_URL": f"redis://127.0.0.1:{rd.port}{redis_db}",
            "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
            "LLMHUB_CONTAINER_PREFIX": settings.CONTAINER_PREFIX,
            "LLMHUB_METRICS_TOKEN": METRICS_TOKEN,
            # One process, so that "warm" is certain: each web process caches the callers and routes it has seen.
            "LLMHUB_WEB_PROCESSES": "1",
            # Short, so that a test can wait past it: what the process knew is then stale.
            "LLMHUB_ROUTE_TTL": str(ROUTE_TTL),
        }
        self.log_dir, self.child = log_dir, None

    def start(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = processes.platform_commands(port=port, schedule=self.log_dir / "unused")["web"]
        [self.child] = processes.start({"web": command}, log_dir=self.log_dir, env=self.env)
        assert processes.wait_for_web(self.url), f"the web process did not start; see {self.log_dir}/web.log"

    def kill(self):
        os.kill(self.child.pid, signal.SIGKILL)
        self.child.wait(timeout=10)

    def log(self) -> str:
        return (self.log_dir / "web.log").read_text(errors="replace")

    def metrics(self) -> str:
        answer = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.text


@pytest.fixture
def outage(transactional_db, tmp_path):
    """A web process behind cuttable PostgreSQL and Redis proxies, with a running deployment whose one ready
    instance is a small engine. Yields SimpleNamespace(web, pg, redis, deployment, token, engine)."""
    db = connection.settings_dict
    redis_url = urlsplit(settings.REDIS_URL)
    # Records an earlier test's web process kept in Redis (stopped during its outage) would be written for this
    # test's deployment: a fresh test database numbers deployments from 1 again.
    redis.Redis.from_url(settings.REDIS_URL).delete(PENDING_KEY)
    engine = engine_server()
    deployment = DeploymentFactory(status="running", model_name="m")
    Instance.objects.create(deployment=deployment, host=HostFactory(), state="ready", port=engine.server_address[1])
    with TcpProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))) as pg, \
            TcpProxy((redis_url.hostname, redis_url.port or 6379)) as rd:  # fmt: skip
        web = Web(tmp_path, pg, rd)
        web.start()
        try:
            yield SimpleNamespace(web=web, pg=pg, redis=rd, deployment=deployment, token=token_for(deployment.user),
                                  engine=engine)  # fmt: skip
        finally:
            processes.stop([web.child], grace=10)
            engine.shutdown()


def chat(outage, token: str | None = None, **body) -> httpx.Response:
    payload = {"model": outage.deployment.full_name, "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(f"{outage.web.url}/v1/openai/chat/completions", json=payload, timeout=30,
                      headers={"Authorization": f"Bearer {token or outage.token}"})  # fmt: skip


def usage_rows(outage) -> list[UsageRecord]:
    return list(UsageRecord.objects.filter(deployment=outage.deployment))


def settled_usage(outage, expected: int) -> list[UsageRecord]:
    """The deployment's usage rows once `expected` are there and a few more flush rounds added none."""
    wait_for(lambda: len(usage_rows(outage)) >= expected, timeout=60, interval=0.5, what=f"{expected} usage rows")
    time.sleep(3)  # further rounds of every writer: nothing written twice
    return usage_rows(outage)


def test_postgres_outage_requests_answered_and_usage_written_once_it_is_back(outage):
    assert chat(outage).status_code == 200  # warm: caller and route cached
    outage.pg.cut()

    answers = [chat(outage) for _ in range(5)] + [chat(outage, stream=True)]
    assert [a.status_code for a in answers] == [200] * 6
    assert answers[0].json()["choices"][0]["message"]["content"] == "hi"
    time.sleep(3)  # several rounds of the usage writer fail meanwhile
    assert outage.engine.hits == 7

    # A caller this process never saw cannot be checked without the database: a 503 in OpenAI's shape, not a 500.
    stranger = chat(outage, token=token_for(UserFactory()))
    assert stranger.status_code == 503 and int(stranger.headers["Retry-After"]) > 0
    assert stranger.json()["error"]["type"] == "server_error"
    assert "temporarily unavailable" in stranger.json()["error"]["message"]

    outage.pg.restore()
    rows = settled_usage(outage, 7)
    assert len(rows) == 7
    assert len({r.idempotency_key for r in rows}) == 7
    assert sorted(r.stream for r in rows) == [False] * 6 + [True]
    assert all(r.status == 200 and r.prompt_tokens == 3 and r.completion_tokens == 1 for r in rows)


def test_postgres_outage_warm_routes_served_past_their_ttl(outage):
    """A caller and route cached before the outage are served for as long as it lasts, not only until their
    cache TTL runs out; one the process never saw is a 503 all along."""
    stranger = token_for(UserFactory())  # before warming: a new user bumps the routing generation (cache cleared)
    assert chat(outage).status_code == 200  # warm: caller and route cached
    # The process runs with the short TTL: a change that bumps no generation (QuerySet.update of the status) is
    # seen once the cached route expired, and undone likewise. The route it serves from below is this fresh one.
    deployments = Deployment.objects.filter(id=outage.deployment.id)
    deployments.update(status="failed", fail_reason="engine crashed")
    time.sleep(ROUTE_TTL * 2)
    assert chat(outage).json()["error"]["code"] == "deployment_failed"
    deployments.update(status="running", fail_reason="")
    time.sleep(ROUTE_TTL * 2)
    assert chat(outage).status_code == 200
    outage.pg.cut()
    time.sleep(ROUTE_TTL * 3)  # every cached entry is now past its TTL

    answers = [chat(outage) for _ in range(3)] + [chat(outage, stream=True)]
    time.sleep(ROUTE_TTL * 2)
    answers += [chat(outage) for _ in range(2)]
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert answers[0].json()["choices"][0]["message"]["content"] == "hi"
    assert outage.engine.hits == 8

    unknown = chat(outage, token=stranger)
    assert unknown.status_code == 503 and int(unknown.headers["Retry-After"]) > 0
    assert unknown.json()["error"]["type"] == "server_error"
    assert 'llmhub_gateway_degraded{dependency="postgresql"} 1.0' in outage.web.metrics()

    outage.pg.restore()
    rows = settled_usage(outage, 8)  # the ones the engine answered (a failed deployment's 503 is not usage)
    assert len(rows) == 8 and len({r.idempotency_key for r in rows}) == 8
    assert all(r.status == 200 and r.prompt_tokens == 3 and r.completion_tokens == 1 for r in rows)
    assert sorted(r.stream for r in rows) == [False] * 7 + [True]
    assert outage.web.log().count("PostgreSQL is unreachable") == 1
    wait_for(lambda: 'llmhub_gateway_degraded{dependency="postgresql"} 0.0' in outage.web.metrics(), timeout=15,
             interval=0.5, what="the gauge back to 0")  # fmt: skip
    # Back to fresh entries: the stranger, whom the outage kept out, now gets in (with no deployment of theirs).
    assert chat(outage, token=stranger).status_code == 404


def test_usage_of_an_outage_survives_the_web_process(outage):
    """Records kept during the outage are in Redis, not only in the process: a web process killed before the
    database comes back loses none, and the next one writes them."""
    assert chat(outage).status_code == 200
    outage.pg.cut()
    assert [chat(outage).status_code for _ in range(4)] == [200] * 4
    pending = redis.Redis.from_url(settings.REDIS_URL)
    wait_for(lambda: pending.llen(PENDING_KEY) >= 4, timeout=15, interval=0.2, what="records kept in Redis")
    outage.web.kill()
    outage.pg.restore()
    outage.web.start()
    assert chat(outage).status_code == 200  # the new process (its background rounds) writes the backlog
    rows = settled_usage(outage, 6)
    assert len(rows) == 6 and len({r.idempotency_key for r in rows}) == 6
    assert pending.llen(PENDING_KEY) == 0


def test_postgres_outage_deploy_api_and_dashboard_answer_503(outage):
    user = outage.deployment.user
    browser = Client()
    browser.force_login(user)
    session = browser.cookies[settings.SESSION_COOKIE_NAME].value
    auth = {"Authorization": f"Bearer {outage.token}"}
    assert httpx.get(f"{outage.web.url}/deploy/list", headers=auth).status_code == 200
    outage.pg.cut()

    for method, path, kwargs in [
        ("GET", "/deploy/list", {}),
        ("GET", f"/deploy/{outage.deployment.deploy_id}", {}),
        ("POST", "/deploy/llm", {"json": {"model_name": "x", "gpu": "CPU", "hf": {"repo": "a/b"}}}),
    ]:
        answer = httpx.request(method, f"{outage.web.url}{path}", headers=auth, timeout=30, **kwargs)
        assert answer.status_code == 503, (path, answer.text)
        assert int(answer.headers["Retry-After"]) > 0
        assert set(answer.json()) == {"detail"} and "temporarily unavailable" in answer.json()["detail"]

    page = httpx.get(f"{outage.web.url}/deployments/", cookies={settings.SESSION_COOKIE_NAME: session}, timeout=30)
    assert page.status_code == 503 and int(page.headers["Retry-After"]) > 0
    assert "temporarily unavailable" in page.text and "Traceback" not in page.text
    assert page.headers["Content-Type"].startswith("text/html")

    outage.pg.restore()
    page = httpx.get(f"{outage.web.url}/deployments/", cookies={settings.SESSION_COOKIE_NAME: session}, timeout=30)
    assert page.status_code == 200
    assert httpx.get(f"{outage.web.url}/deploy/list", headers=auth).status_code == 200
    assert "Traceback" not in outage.web.log()


def test_redis_outage_requests_answered_limits_degrade_open_and_say_so_once(outage):
    user = outage.deployment.user
    user.rate_limit_per_minute = 5  # one request per lease: every request is counted in Redis
    user.save(update_fields=["rate_limit_per_minute"])
    assert chat(outage).status_code == 200
    outage.redis.cut()

    # Past the limit of 5 and still answered: the limit degrades open while Redis is away.
    answers = [chat(outage) for _ in range(8)] + [chat(outage, stream=True)]
    assert [a.status_code for a in answers] == [200] * 9
    assert 'llmhub_gateway_degraded{dependency="redis"} 1.0' in outage.web.metrics()
    assert outage.web.log().count("Redis is unreachable") == 1  # once per outage, not per request

    outage.redis.restore()
    wait_for(lambda: 'llmhub_gateway_degraded{dependency="redis"} 0.0' in outage.web.metrics(), timeout=15,
             interval=0.5, what="the gauge back to 0")  # fmt: skip
    assert outage.web.log().count("Redis is back") == 1
    # The limit counts again: of 11 requests, at most 4 + 5 fit (even across a minute boundary).
    statuses = [chat(outage).status_code for _ in range(11)]
    assert 429 in statuses and set(statuses) == {200, 429}
    rows = settled_usage(outage, 10 + statuses.count(200))
    assert len(rows) == 10 + statuses.count(200)


def test_postgres_and_redis_down_together(outage):
    assert chat(outage).status_code == 200
    outage.pg.cut()
    outage.redis.cut()
    assert [chat(outage).status_code for _ in range(4)] == [200] * 4
    time.sleep(2)
    outage.redis.restore()
    outage.pg.restore()
    rows = settled_usage(outage, 5)
    assert len(rows) == 5 and len({r.idempotency_key for r in rows}) == 5
