"""The web server's command: uvicorn serving `llmhub.asgi:application` with LLMHUB_WEB_PROCESSES processes.

    python -m llmhub.web --host 127.0.0.1 --port 8000 [any other uvicorn option]

Runs as many processes as the machine has cores unless LLMHUB_WEB_PROCESSES says otherwise (uvicorn's
``--workers``: one listening socket, a supervisor that replaces a process that dies). Everything the
gateway counts across requests holds across processes: rate limits, held requests and in-flight counts
live in Redis, wake-ups are claimed in PostgreSQL, cached routes follow the routing generation. With more
than one process, Prometheus metrics are kept in prometheus-client's multiprocess mode (one fresh
directory per start, PROMETHEUS_MULTIPROC_DIR, unless set) so that /metrics sums every process.
Used by `bin/up` (`llmhub/processes.py`), Compose and the Dockerfile.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def argv(processes: int, options: list[str]) -> list[str]:
    """uvicorn's command line for `processes` processes, with `options` (``--host``, ``--port``...) after."""
    uvicorn = Path(sys.executable).parent / "uvicorn"
    workers = ["--workers", str(processes)] if processes > 1 else []
    return [str(uvicorn), "llmhub.asgi:application", *workers, *options]


def environment(processes: int, environ: dict[str, str]) -> dict[str, str]:
    """`environ` with PROMETHEUS_MULTIPROC_DIR set to a fresh directory when several processes serve."""
    if processes > 1 and not environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return {**environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="llmhub-metrics-")}
    return environ


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")
    from django.conf import settings

    processes = settings.WEB_PROCESSES
    command = argv(processes, sys.argv[1:])
    os.execve(command[0], command, environment(processes, dict(os.environ)))


if __name__ == "__main__":
    main()
