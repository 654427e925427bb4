"""An in-memory stand-in for the engine seam (`llmhub.fleet.engine`), for unit tests.

Keeps containers per engine URL as Docker Engines would, records every request, and can be told
to lose an engine (`down`), crash or stop a container, or lack an image. Thread-safe, so several
reconcile workers can share it.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from datetime import UTC, datetime

from llmhub.fleet import engine

SEAM = (
    "container_run", "container_get", "container_remove", "container_logs", "containers_list",
    "image_present", "image_pull", "engine_facts", "volume_remove", "container_death_seen",
)  # fmt: skip


class FakeEngine:
    def __init__(self):
        self.lock = threading.RLock()
        self.hosts: dict[str, dict[str, engine.ContainerInfo]] = defaultdict(dict)  # url → name → container
        self.runs: list[engine.ContainerSpec] = []
        self.run_urls: list[str] = []
        self.healthy = True
        self.ports = itertools.count(40001)
        self.ids = itertools.count(1)
        self.images_everywhere = {"llmhub/vllm-cpu:test"}
        self.images: dict[str, set[str]] = defaultdict(set)  # url → images pulled there
        self.pulls: list[tuple[str, str]] = []
        self.pull_error: str | None = None
        self.down: set[str] = set()  # urls whose engine does not answer
        self.gpus: dict[str, int] = {}  # url → GPUs the engine advertises
        self.logs = "RuntimeError: CUDA out of memory"
        self.volumes: dict[str, set[str]] = defaultdict(set)  # url → cache volumes made there
        self.deaths: dict[str, set[str]] = defaultdict(set)  # url → ids of containers whose death it saw
        self.engine_ids: dict[str, str] = {}  # url → engine ID (default: one engine per URL)
        self.runs_seen: list[tuple[str, str, list[str]]] = []  # (url, name, other running containers there)

    def install(self, monkeypatch) -> FakeEngine:
        for name in SEAM:
            monkeypatch.setattr(engine, name, getattr(self, name))
        return self

    def _check(self, target) -> str:
        url = engine.endpoint_of(target).url
        if url in self.down:
            raise engine.EngineUnreachable(f"{url}: the engine did not answer (connection refused)")
        return url

    @property
    def containers(self) -> dict[str, engine.ContainerInfo]:
        """Every container on every engine, by name."""
        with self.lock:
            return {name: info for host in self.hosts.values() for name, info in host.items()}

    def container_run(self, target, spec):
        with self.lock:
            url = self._check(target)
            if not self.image_present(target, spec.image):
                raise engine.EngineError(f"starting {spec.name} failed: No such image: {spec.image}")
            self.runs.append(spec)
            self.run_urls.append(url)
            if spec.cache_volume:
                self.volumes[url].add(spec.cache_volume)
            others = sorted(n for n, c in self.hosts[url].items() if c.running and n != spec.name)
            self.runs_seen.append((url, spec.name, others))
            if spec.name not in self.hosts[url]:
                self.hosts[url][spec.name] = engine.ContainerInfo(
                    id=f"c{next(self.ids)}-{spec.name}", name=spec.name, status="running", exit_code=None,
                    host_port=next(self.ports), labels=dict(spec.labels), started_at=datetime.now(UTC),
                )  # fmt: skip
            return self.hosts[url][spec.name]

    def volume_remove(self, target, name):
        with self.lock:
            url = self._check(target)
            if any(c.labels.get(engine.LABEL_OWNER_ID) and name.endswith(f"-u{c.labels[engine.LABEL_OWNER_ID]}")
                   for c in self.hosts[url].values()):  # fmt: skip
                raise engine.EngineError(f"removing volume {name} failed: volume is in use")
            if name not in self.volumes[url]:
                return False
            self.volumes[url].discard(name)
            return True

    def image_present(self, target, image):
        with self.lock:
            url = self._check(target)
            return image in self.images_everywhere or image in self.images[url]

    def image_pull(self, target, image, progress=None):
        url = self._check(target)
        self.pulls.append((url, image))
        if self.pull_error:
            raise engine.EngineError(f"pulling {image} failed: {self.pull_error}")
        total = 400_000_000
        for done in (0, 100_000_000, 210_000_000, 330_000_000, total):
            if progress:
                progress(engine.PullProgress(done_bytes=done, total_bytes=total, layers_done=0, layers_total=4))
        with self.lock:
            self.images[url].add(image)

    def container_get(self, target, name):
        with self.lock:
            return self.hosts[self._check(target)].get(name)

    def container_remove(self, target, name):
        with self.lock:
            return self.hosts[self._check(target)].pop(name, None) is not None

    def container_logs(self, target, name, tail=40):
        with self.lock:
            # The last `tail` lines, as Docker gives them.
            return "\n".join(self.logs.splitlines()[-tail:]) if name in self.hosts[self._check(target)] else ""

    def containers_list(self, target, installation):
        with self.lock:
            return [
                c
                for c in self.hosts[self._check(target)].values()
                if c.labels.get(engine.LABEL_INSTALLATION) == installation
            ]

    def engine_facts(self, target):
        url = self._check(target)
        count = self.gpus.get(url)
        return engine.EngineFacts(
            server_version="20.10.24", gpu_count=count, gpu_ids=[f"GPU-{i}" for i in range(count or 0)], runtimes=[],
            engine_id=self.engine_ids.get(url, f"ENGINE:{url}"),
        )  # fmt: skip

    def container_death_seen(self, target, container_id, *, finished_at):
        with self.lock:
            return container_id in self.deaths[self._check(target)]

    def _find(self, name) -> tuple[str, engine.ContainerInfo]:
        for url, host in self.hosts.items():
            if name in host:
                return url, host[name]
        raise KeyError(name)

    def exit(self, name, code=1, *, oom=False):
        """The container `name` exits with `code` (now)."""
        with self.lock:
            url, info = self._find(name)
            self.hosts[url][name] = engine.ContainerInfo(
                info.id, name, "exited", code, None, info.labels, info.started_at, datetime.now(UTC), oom
            )
            self.deaths[url].add(info.id)

    crash = exit

    def restart_engine(self, url, code=0):
        """The engine at `url` restarts without live-restore: its shutdown stops every running container
        (exit `code`: 0 for vLLM's graceful stop) and it forgets its events."""
        with self.lock:
            for name, info in list(self.hosts[url].items()):
                if info.running:
                    self.exit(name, code)
            self.deaths[url].clear()

    def vanish(self, name):
        """The container `name` is removed behind LLMHub's back."""
        with self.lock:
            url, _ = self._find(name)
            del self.hosts[url][name]
