import threading
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest
import time_machine

from llmhub.fleet import images
from llmhub.fleet.services import gpu_type_ensure, host_register
from tests.billing_support import at
from tests.engines import GPU, Dockerd, containers, register
from tests.factories import GpuTypeFactory, HostFactory, UserFactory, token_for
from tests.fakes.engine import FakeEngine
from tests.stack import DOCKER, Platform, containers_remove, engine_image, platform_clear

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def quick_flush():
    """Transactional tests end with Django's flush of every table; on PostgreSQL that is one TRUNCATE of all
    of them, about 0.65 s a test on this machine (each table's files are replaced). DELETE FROM each table
    empties the same tables in a few milliseconds: the tables hold a handful of rows, and the foreign keys
    Django creates are DEFERRABLE INITIALLY DEFERRED, checked when the flush's transaction commits, when no
    row is left. The tables are locked first, as TRUNCATE would lock them: a process outside the test (the
    shared web processes write usage records up to a second after an answer) could otherwise commit a row
    that references a user the flush already deleted, failing the flush's commit (seen in CI). A flush that
    resets sequences or cascades to other tables keeps Django's TRUNCATE."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or allow_cascade:
            return truncate(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        if not tables:
            return []
        names = [style.SQL_FIELD(self.quote_name(table)) for table in tables]
        lock = f"{style.SQL_KEYWORD('LOCK TABLE')} {', '.join(names)} {style.SQL_KEYWORD('IN ACCESS EXCLUSIVE MODE')};"
        delete = style.SQL_KEYWORD("DELETE FROM")
        return [lock, *(f"{delete} {name};" for name in names)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DatabaseOperations, "sql_flush", sql_flush)
        yield


@pytest.fixture(autouse=True)
def fresh_gateway_state():
    """The gateway's per-process caches and counters start empty in every test."""
    from llmhub.gateway import degraded, limits, load, routing, usage_buffer

    limits._leases.clear()
    routing.cache.clear()
    routing.cache.generation, routing.cache.checked_at = None, 0.0
    load.inflight.clear()
    load.outstanding.clear()
    usage_buffer.records.clear()
    degraded.redis.ok()
    degraded.database.ok()


@pytest.fixture(autouse=True)
def hub_reachable_again():
    """A test that made the fit check give up on the model hub (remembered for a minute in the shared cache)
    does not make the next test's estimates skip the hub."""
    from django.core.cache import cache

    from llmhub.deployments.fit import UNREACHABLE_KEY

    yield
    cache.delete(UNREACHABLE_KEY)


@pytest.fixture
def clock_start():
    """Where `clock` stops time: Sunday 2026-03-01 00:00 UTC (a module overrides this fixture for another instant)."""
    return at(1)


@pytest.fixture
def clock(clock_start):
    """Time stands still at `clock_start` until the test moves it (`clock.shift(timedelta)`, `clock.move_to`)."""
    with time_machine.travel(clock_start, tick=False) as traveller:
        yield traveller


@pytest.fixture
def fake(monkeypatch):
    """The stubbed engine seam (tests/fakes/engine.py) with healthy engines; stops take effect at once
    (nothing is in flight in these tests, so no drain wait)."""
    from llmhub.fleet import reconcile, scaling

    fake = FakeEngine().install(monkeypatch)
    monkeypatch.setattr(reconcile.vllm, "engine_healthy", lambda base_url, **kw: fake.healthy)
    monkeypatch.setattr(scaling, "DRAIN_MIN_SECONDS", 0.0)
    return fake


@pytest.fixture
def user(db):
    return UserFactory(username="alice")


@pytest.fixture
def other_user(db):
    return UserFactory(username="bob")


@pytest.fixture
def token(user):
    return token_for(user)


@pytest.fixture
def cpu_host(db):
    return HostFactory(name="local", gpu_type=GpuTypeFactory(name="CPU"), gpu_count=2)


@pytest.fixture
def auth(token):
    """Headers for Django's test client carrying `token` as a Bearer token."""
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


LANES = ("engines", "integration", "others")
INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_addoption(parser):
    parser.addoption(
        "--lane", choices=LANES,
        help="run one of bin/test's three lanes: 'engines' (real vLLM and the shared platform: mostly waiting on "
             "engines), 'integration' (the integration tier and every other Docker Engine test, the fleet's extra "
             "engines included) or 'others' (unit, security and browser tests on their own servers)",
    )  # fmt: skip


def lane_of(item) -> str:
    """Which of bin/test's lanes runs a test: 'engines' when it runs real vLLM or the shared platform;
    'integration' when it is in tests/integration, needs the Docker Engine or the fleet's extra Docker
    Engines (whose start and stop touch the machine's network bridges: one lane runs them one after
    another); 'others' for the rest (browser tests on a live server of their own included). A module that
    needs none of the first two may name its lane with ``pytest.mark.lane(name)`` to even the lanes out."""
    if (marker := item.get_closest_marker("lane")) is not None:
        if marker.args[0] not in LANES:  # a test in no lane would never run
            raise pytest.UsageError(f"{item.nodeid}: unknown lane {marker.args[0]!r} (one of {', '.join(LANES)})")
        return marker.args[0]
    fixtures = set(getattr(item, "fixturenames", ()))
    if item.get_closest_marker("vllm") or "running_platform" in fixtures:
        return "engines"
    if item.get_closest_marker("docker") or "fleet_engines" in fixtures or INTEGRATION in item.path.parents:
        return "integration"
    return "others"


def pytest_collection_modifyitems(session, config, items):
    """With ``--lane``, keep only that lane's tests. Tests on the shared platform run one after another (where
    the first of them is), so that it runs only while they do: other tiers' tests start workers of their own
    on the same queue and database."""
    lane = config.getoption("--lane")
    if lane:
        kept = [item for item in items if lane_of(item) == lane]
        dropped = [item for item in items if item not in set(kept)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    users = [
        item for item in items
        if "running_platform" in getattr(item, "fixturenames", ()) and "platform_stopped" not in item.fixturenames
    ]  # fmt: skip
    if users:
        first = items.index(users[0])
        rest = [item for item in items if item not in set(users)]
        items[:] = rest[:first] + users + rest[first:]
        config.stash[LAST_PLATFORM_TEST] = users[-1].nodeid


LAST_PLATFORM_TEST = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def running_platform(django_db_setup, tmp_path_factory):
    """The real platform (web, worker, beat; tests/stack.py), started once per test session when a test first
    needs it and stopped after the last test that uses it (see `pytest_collection_modifyitems`)."""
    platform = Platform(tmp_path_factory.mktemp("stack-logs"))
    try:
        yield platform
    finally:
        platform.stop()


@pytest.fixture
def cpu_hourly_price():
    """The price per GPU-hour of the `stack` fixture's CPU host (override in a module)."""
    return Decimal("0")


@pytest.fixture
def stack(running_platform, transactional_db, cpu_hourly_price, request):
    """The real platform (web, worker, beat), shared by the session, with the local Docker Engine as a 2-slot
    CPU host. Each test brings its own users and deployments; they are deleted and their containers removed
    after it.

    Yields the web base URL. Tests using it must be `django_db(transaction=True)`: the platform's
    processes see only committed rows.
    """
    containers_remove()  # anything a previous test's last reconcile pass started
    host_register(
        name="local", docker_url=DOCKER, address="127.0.0.1",
        gpu_type=gpu_type_ensure(name="CPU", uses_devices=False, hourly_price=cpu_hourly_price), gpu_count=2,
        engine_image=engine_image(),
    )  # fmt: skip
    try:
        yield running_platform.url()
    finally:
        platform_clear()
        if request.node.nodeid == request.config.stash.get(LAST_PLATFORM_TEST, None):
            running_platform.stop()


@pytest.fixture
def platform_stopped(running_platform):
    """For a test that runs the platform's processes itself (on the same queue and database): the shared
    platform is not running meanwhile."""
    running_platform.stop()


@pytest.fixture(scope="session")
def fleet_engines(tmp_path_factory):
    """Two extra Docker Engines on this machine as GPU hosts, with the small fake engine image loaded.

    `a`: unix socket, advertises 4 GPUs, publishes on 127.0.0.2. `b`: tcp:// with TLS client
    certificates, advertises 4 GPUs, ``--live-restore``, publishes on 127.0.0.3. Both accept NVIDIA
    device requests (see tests/engines.py). Started once per test session, removed at its end.
    Yields SimpleNamespace(a, b, image, main) where `main` is a client of the machine's engine.
    """
    main = docker.from_env(timeout=600)
    image = images.engine_image_ensure(recipe="fake-engine", progress=lambda line: None)
    base = tmp_path_factory.mktemp("fleet-engines")
    engines = [
        Dockerd("gpu-a", base=base / "a", index=1, address="127.0.0.2", gpus=4),
        Dockerd("gpu-b", base=base / "b", index=2, address="127.0.0.3", gpus=4, tls=True, live_restore=True),
    ]
    errors = []

    def bring_up(dockerd):
        try:
            dockerd.start()
            dockerd.load(main, image)
        except Exception as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    threads = [threading.Thread(target=bring_up, args=(d,)) for d in engines]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield SimpleNamespace(a=engines[0], b=engines[1], image=image, main=main)
    finally:
        for dockerd in engines:
            dockerd.destroy()


@pytest.fixture
def fleet(fleet_engines, db):
    """Hosts gpu-a and gpu-b (4 × H100-80GB each, see `fleet_engines`) in the database, their engines
    running; this installation's containers on them are removed afterwards."""
    for dockerd in (fleet_engines.a, fleet_engines.b):
        if dockerd.process is None or dockerd.process.poll() is not None:
            dockerd.start()
    h100 = GpuTypeFactory(name=GPU, memory_gb=80, uses_devices=True)
    a = register(fleet_engines.a, h100, image=fleet_engines.image)
    b = register(fleet_engines.b, h100, image=fleet_engines.image)
    yield SimpleNamespace(a=a, b=b, engines=fleet_engines, gpu_type=h100, owner=UserFactory(username="fleet"))
    for dockerd in (fleet_engines.a, fleet_engines.b):
        if dockerd.process is None or dockerd.process.poll() is not None:
            dockerd.start()
        for container in containers(dockerd):
            container.remove(force=True)
