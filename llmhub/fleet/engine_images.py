"""The engine seam's image calls (part of the seam; `engine` re-exports these names): whether an engine
has an image, pulls with progress, builds from a context directory and imports of a root filesystem.

Docker SDK for Python 7 (``APIClient``) over the Docker Engine API: ``GET /images/<name>/json``
(`image_present`), ``POST /images/create?fromImage=`` streamed (`image_pull`), ``POST /build`` with
the legacy builder, streamed (`image_build`), ``POST /images/create?fromSrc=-`` (`image_import`).
What is built and from which recipe (recipes, hashes, build contexts, progress lines) is `images`'
business; this module only talks to the engine. Failures raise `EngineError`; an engine that does not
answer raises `EngineUnreachable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from docker.errors import NotFound

from .engine_endpoint import Endpoint, EngineError, client_for, engine_call
from .engine_spec import PullProgress

PULL_TIMEOUT_S = 600  # the longest pause between two chunks of a pull's progress stream
BUILD_TIMEOUT_S = 3600  # the longest a build may take (its stream is one request)
IMPORT_TIMEOUT_S = 600  # sending a root filesystem tarball (a few hundred MB) to the engine


class ImageBuildError(EngineError):
    """The engine ran a build and a step failed; `detail` is Docker's message for it (e.g. ``The command
    '/bin/sh -c pip install …' returned a non-zero code: 1``)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def image_present(target: Endpoint | str, image: str) -> bool:
    """True when the host's engine has `image` (name:tag) locally. Raises EngineError, EngineUnreachable."""
    client = client_for(target)
    with engine_call(f"inspecting image {image}"):
        try:
            client.api.inspect_image(image)
            return True
        except NotFound:
            return False


def image_pull(target: Endpoint | str, image: str, *, progress: Callable[[PullProgress], None] | None = None) -> None:
    """Pull `image` (``[registry/]name[:tag]``, tag "latest" when absent) onto the host; blocks until done.

    `progress` is called after every progress message of the engine's stream (`POST /images/create`)
    with bytes downloaded so far over all layers. Raises EngineError when the registry or the engine
    refuses (unknown image, no registry), EngineUnreachable.
    """
    repository, tag = _split_image(image)
    client = client_for(target, timeout=PULL_TIMEOUT_S)
    layers: dict[str, tuple[int, int]] = {}  # layer id → (done bytes, total bytes)
    finished: set[str] = set()
    with engine_call(f"pulling {image}"):
        for message in client.api.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in message:
                detail = (message.get("errorDetail") or {}).get("message") or message["error"]
                raise EngineError(f"pulling {image} failed: {detail}")
            layer, status = message.get("id"), message.get("status", "")
            if not layer or layer == tag:
                continue
            detail = message.get("progressDetail") or {}
            done, total = layers.get(layer, (0, 0))
            if status == "Downloading" and detail.get("total"):
                done, total = detail.get("current", done), detail["total"]
            elif status in ("Download complete", "Verifying Checksum", "Extracting", "Pull complete", "Already exists"):
                done = total
            layers[layer] = (done, total)
            if status in ("Pull complete", "Already exists"):
                finished.add(layer)
            if progress is not None:
                progress(
                    PullProgress(
                        done_bytes=sum(d for d, _ in layers.values()),
                        total_bytes=sum(t for _, t in layers.values()),
                        layers_done=len(finished),
                        layers_total=len(layers),
                    )
                )


def _split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` → (``registry:5000/name``, ``tag``); the tag defaults to "latest"."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, "latest"
    return name, tag


def image_build(
    target: Endpoint | str,
    *,
    context: Path,
    tag: str,
    labels: dict[str, str],
    timeout: int = BUILD_TIMEOUT_S,
) -> Iterator[str]:
    """Build the ``Dockerfile`` of directory `context` into image `tag` (with `labels`) on the engine,
    yielding the build's output as the engine streams it (text with newlines, ANSI colours included:
    ``Step 3/12 : RUN …``, ``---> Using cache``, the commands' own output).

    Docker's legacy builder (``POST /build``): the context is sent as a tar archive, intermediate
    containers are removed even when a step fails, base images are never pulled (``FROM`` an image the
    engine has), and Docker's layer cache answers unchanged steps. Raises ImageBuildError when a step
    fails, EngineError when the engine refuses the build, EngineUnreachable; the image may then be
    absent (check with `image_present`).
    """
    client = client_for(target, timeout=timeout)
    with engine_call(f"building {tag}"):
        stream = client.api.build(
            path=str(context), tag=tag, rm=True, forcerm=True, pull=False, decode=True, timeout=timeout, labels=labels
        )
        for chunk in stream:
            if "error" in chunk:
                detail = str((chunk.get("errorDetail") or {}).get("message") or chunk["error"])
                raise ImageBuildError(f"building {tag} failed: {detail.strip()}", detail)
            if chunk.get("stream"):
                yield chunk["stream"]


def image_import(target: Endpoint | str, tarball: Path, *, image: str) -> None:
    """Make image `image` (``name:tag``) from `tarball`, a tar of a root filesystem (``docker import``).

    Raises EngineError when the engine refuses it, EngineUnreachable.
    """
    repository, tag = _split_image(image)
    client = client_for(target, timeout=IMPORT_TIMEOUT_S)
    with engine_call(f"importing {image}"):
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
