"""Images built from recipes in ``workers/images/<recipe>/`` (no image registry needed): the engine
images (``vllm-cpu``, ``fake-engine``) and the images ``compose.yaml`` runs on a machine that cannot
pull (``platform-base``, ``postgres``, ``redis``).

A recipe is a directory holding a ``Dockerfile`` and the files it copies. Its image is tagged
``llmhub/<recipe>:<recipe hash>``, so any change to the recipe (or to the torch wheel it installs,
or to the project files it names) gives a new tag, and an unchanged recipe is found in Docker's
image store without building.

A recipe may name files of the project itself in ``project-files`` (one path a line, relative to
the repository root; ``#`` starts a comment): they are copied into the build context under the same
relative path and hashed with the recipe (``platform-base`` names ``requirements.lock``).

Build inputs from the host, added to the build context next to the recipe files when its
Dockerfile names them (the vLLM recipe does; the small ``fake-engine`` recipe needs neither):

- the torch CPU wheel, ``torch-*+cpu-cp311-*.whl`` from ``$LLMHUB_WHEELS_DIR`` (default
  ``/opt/wheels``);
- the CA bundle pip inside the build trusts, ``$LLMHUB_CA_BUNDLE`` or ``$PIP_CERT`` (default
  ``/etc/ssl/certs/ca-certificates.crt``), copied in as ``ca-certificates.crt``.

A recipe whose Dockerfile starts ``FROM llmhub/debian-bookworm:minbase`` gets that base made
locally when missing: ``debootstrap --variant=minbase bookworm`` then ``docker import``
(about 35 s; needs root and the ``debootstrap`` program).

Every Docker call (is the image there, build, import) goes through the engine seam (`engine`, see
`engine_images`) to one engine: the machine's own (`engine.local_engine()`) unless a caller names
another. This module keeps the recipes, their hashes, the build context and the progress lines. It
needs no Django settings (the seam reads them only for engines reached over TLS), so it runs as
``python -m llmhub.fleet.images [--recipe vllm-cpu]``, which ensures the image and prints its tag
as the last line of stdout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import engine

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = PROJECT_ROOT / "workers" / "images"
PROJECT_FILES = "project-files"
BASE_IMAGE = "llmhub/debian-bookworm:minbase"
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
TORCH_WHEEL_GLOB = "torch-*+cpu-cp311-cp311-*.whl"
CA_BUNDLE_NAME = "ca-certificates.crt"
LOG_TAIL_LINES = 40

_IGNORED_PARTS = {"__pycache__", ".pytest_cache"}
_STEP_RE = re.compile(r"^Step \d+/\d+ : ")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


class EngineImageError(RuntimeError):
    """An engine image (or its base) could not be built.

    ``str(error)`` says what failed and ends with the last lines of the build log;
    ``error.log_tail`` holds those lines as a list of strings.
    """

    def __init__(self, message: str, log_tail: list[str] | None = None):
        self.log_tail = list(log_tail or [])
        if self.log_tail:
            message = message + "\n--- last build log lines ---\n" + "\n".join(self.log_tail)
        super().__init__(message)


def recipe_dir(recipe: str = "vllm-cpu") -> Path:
    """Path of ``workers/images/<recipe>/``; ``EngineImageError`` if it has no ``Dockerfile``."""
    path = RECIPES_DIR / recipe
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", recipe) or not (path / "Dockerfile").is_file():
        raise EngineImageError(f"unknown engine image recipe {recipe!r}: no {path}/Dockerfile")
    return path


def recipe_files(recipe: str = "vllm-cpu") -> list[Path]:
    """The recipe's files as paths relative to its directory, sorted (caches and .pyc left out)."""
    root = recipe_dir(recipe)
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not _IGNORED_PARTS.intersection(rel.parts) and path.suffix != ".pyc":
            files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def project_files(recipe: str = "vllm-cpu") -> list[Path]:
    """Project files a recipe names in its ``project-files`` (relative to the repository root), sorted.

    Raises ``EngineImageError`` when a named file is missing or lies outside the repository.
    """
    listing = recipe_dir(recipe) / PROJECT_FILES
    if not listing.is_file():
        return []
    names = []
    for line in listing.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = (PROJECT_ROOT / name).resolve()
        if not path.is_relative_to(PROJECT_ROOT) or not path.is_file():
            raise EngineImageError(f"{listing}: {name!r} is not a file of the project")
        names.append(path.relative_to(PROJECT_ROOT))
    return sorted(set(names), key=lambda p: p.as_posix())


def torch_wheel() -> Path:
    """The torch CPU wheel the recipe installs (``$LLMHUB_WHEELS_DIR``, default ``/opt/wheels``).

    Raises ``EngineImageError`` when none is there. With several, the last by name wins.
    """
    wheels_dir = os.environ.get("LLMHUB_WHEELS_DIR", "/opt/wheels")
    found = sorted(glob.glob(os.path.join(wheels_dir, TORCH_WHEEL_GLOB)))
    if not found:
        raise EngineImageError(f"no torch CPU wheel ({TORCH_WHEEL_GLOB}) in {wheels_dir}")
    return Path(found[-1])


def ca_bundle() -> Path:
    """The CA bundle copied into the build so pip reaches PyPI through the host's TLS setup."""
    path = Path(
        os.environ.get("LLMHUB_CA_BUNDLE") or os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    )
    if not path.is_file():
        raise EngineImageError(f"CA bundle {path} not found (set LLMHUB_CA_BUNDLE)")
    return path


def recipe_hash(recipe: str = "vllm-cpu") -> str:
    """Content hash of a recipe: 12 lowercase hex chars.

    sha256 over, for each file of ``workers/images/<recipe>/`` in sorted relative-path order, the
    path, a NUL, the file's bytes and a NUL; then the same for each project file the recipe names
    (path prefixed ``project:``); then, for a recipe that installs the torch wheel, the wheel's file
    name (the wheel itself is not read: its name carries its version). Raises ``EngineImageError``
    for an unknown recipe, a missing project file or a missing wheel.
    """
    root = recipe_dir(recipe)
    digest = hashlib.sha256()
    for rel in recipe_files(recipe):
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update((root / rel).read_bytes() + b"\0")
    for rel in project_files(recipe):
        digest.update(b"project:" + rel.as_posix().encode() + b"\0")
        digest.update((PROJECT_ROOT / rel).read_bytes() + b"\0")
    if _uses_wheel(recipe):
        digest.update(torch_wheel().name.encode())
    return digest.hexdigest()[:12]


def _dockerfile_text(recipe: str) -> str:
    return (recipe_dir(recipe) / "Dockerfile").read_text()


def _uses_wheel(recipe: str) -> bool:
    """True when the recipe's Dockerfile copies the torch wheel (``COPY torch-*.whl``)."""
    return "torch-" in _dockerfile_text(recipe)


def _uses_ca_bundle(recipe: str) -> bool:
    """True when the recipe's Dockerfile copies the host CA bundle."""
    return CA_BUNDLE_NAME in _dockerfile_text(recipe)


def recipe_tag(recipe: str = "vllm-cpu") -> str:
    """The image tag for a recipe's current content: ``llmhub/<recipe>:<recipe_hash>``."""
    return f"llmhub/{recipe}:{recipe_hash(recipe)}"


@contextlib.contextmanager
def _host_lock(name: str) -> Iterator[None]:
    """Serialise builds of one tag between processes on this machine (a flock in the temp dir)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    with open(os.path.join(tempfile.gettempdir(), f"llmhub-image-{safe}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_image_ensure(*, target: engine.Endpoint | str | None = None, progress: Callable[[str], None] = print) -> str:
    """Make ``llmhub/debian-bookworm:minbase`` on engine `target` (default: this machine's) unless it
    exists; returns that tag.

    ``debootstrap --variant=minbase bookworm DIR http://deb.debian.org/debian`` (needs root and
    network access to the Debian mirror), then the directory is tarred and imported
    (`engine.image_import`, as ``docker import``). Raises ``EngineImageError`` with the debootstrap log
    tail on failure, ``engine.EngineError`` / ``engine.EngineUnreachable`` when the engine refuses or
    does not answer.
    """
    target = target or engine.local_engine()
    if engine.image_present(target, BASE_IMAGE):
        return BASE_IMAGE
    with _host_lock(BASE_IMAGE):
        if engine.image_present(target, BASE_IMAGE):
            return BASE_IMAGE
        if shutil.which("debootstrap") is None:
            raise EngineImageError(f"{BASE_IMAGE} is missing and debootstrap is not installed")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="llmhub-base-") as tmp:
            rootfs = os.path.join(tmp, "rootfs")
            progress(f"base: debootstrap --variant=minbase {BASE_SUITE} ({BASE_MIRROR})")
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", BASE_SUITE, rootfs, BASE_MIRROR],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if proc.returncode != 0:
                raise EngineImageError(
                    f"debootstrap of {BASE_SUITE} failed (exit {proc.returncode})",
                    proc.stdout.splitlines()[-LOG_TAIL_LINES:],
                )
            tarball = os.path.join(tmp, "rootfs.tar")
            proc = subprocess.run(
                ["tar", "-C", rootfs, "-c", "-f", tarball, "."],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if proc.returncode != 0:
                raise EngineImageError("tar of the base rootfs failed", proc.stdout.splitlines())
            progress(f"base: docker import -> {BASE_IMAGE}")
            try:
                engine.image_import(target, Path(tarball), image=BASE_IMAGE)
            except engine.EngineUnreachable:
                raise
            except engine.EngineError as exc:
                raise EngineImageError(f"docker import of {BASE_IMAGE} failed: {exc}") from exc
        if not engine.image_present(target, BASE_IMAGE):
            raise EngineImageError(f"docker import finished but {BASE_IMAGE} is not in the image store")
        progress(f"base: {BASE_IMAGE} ready in {time.monotonic() - started:.0f} s")
        return BASE_IMAGE


def _dockerfile_base(recipe: str) -> str | None:
    for line in _dockerfile_text(recipe).splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            return words[1] if len(words) > 1 else None
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _build_context(recipe: str, into: Path) -> None:
    """Fill ``into`` with the recipe files, the project files it names and, when its Dockerfile names
    them, the torch wheel and the CA bundle."""
    root = recipe_dir(recipe)
    for rel in recipe_files(recipe):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, into / rel)
    for rel in project_files(recipe):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, into / rel)
    if _uses_wheel(recipe):
        wheel = torch_wheel()
        _link_or_copy(wheel, into / wheel.name)
    if _uses_ca_bundle(recipe):
        shutil.copyfile(ca_bundle(), into / CA_BUNDLE_NAME)


def engine_image_ensure(
    *,
    target: engine.Endpoint | str | None = None,
    recipe: str = "vllm-cpu",
    progress: Callable[[str], None] = print,
) -> str:
    """Make sure the image for ``recipe`` is in engine ``target``'s image store (default: this machine's
    engine, `engine.local_engine()`); returns its tag.

    The tag is ``llmhub/<recipe>:<recipe_hash(recipe)>``. When `engine.image_present` finds it, this
    returns at once (one Docker API call). Otherwise: the local base image is made if the Dockerfile
    needs it and it is missing (see ``base_image_ensure``), a temporary build context is assembled
    (recipe files + torch wheel + CA bundle) and the image is built by the engine seam
    (`engine.image_build`: Docker's legacy builder), reusing Docker's layer cache from earlier builds
    of the recipe. ``progress`` receives one line per Dockerfile step (``Step
    3/12 : RUN ...``, ``(cached)`` when the layer cache answered it), not pip's output; the
    first build takes minutes (about 3 on 2 cores), a cached rebuild seconds.

    Builds of the same tag by several processes on one machine are serialised with a file lock;
    the later one finds the image and returns.

    Raises ``EngineImageError`` (with the last build log lines) when the recipe, wheel or CA
    bundle is missing, the base cannot be made, or the build fails; ``engine.EngineError`` when the
    engine refuses, ``engine.EngineUnreachable`` when it does not answer.
    """
    target = target or engine.local_engine()
    tag = recipe_tag(recipe)
    if engine.image_present(target, tag):
        return tag
    with _host_lock(tag):
        if engine.image_present(target, tag):
            return tag
        if _dockerfile_base(recipe) == BASE_IMAGE:
            base_image_ensure(target=target, progress=progress)
        started = time.monotonic()
        progress(f"building {tag} from {recipe_dir(recipe)}")
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        last_step = None
        with tempfile.TemporaryDirectory(prefix=f"llmhub-build-{recipe}-") as tmp:
            context = Path(tmp)
            _build_context(recipe, context)
            labels = {"llmhub.recipe": recipe, "llmhub.recipe.hash": tag.rsplit(":", 1)[1]}
            try:
                for text in engine.image_build(target, context=context, tag=tag, labels=labels):
                    for line in _ANSI_RE.sub("", text).splitlines():
                        line = line.rstrip()
                        if not line:
                            continue
                        tail.append(line)
                        if _STEP_RE.match(line):
                            last_step = " ".join(line.split())
                            shown = last_step if len(last_step) <= 160 else last_step[:157] + "..."
                            progress(f"[{time.monotonic() - started:5.0f} s] {shown}")
                        elif line.strip() == "---> Using cache":
                            progress(f"[{time.monotonic() - started:5.0f} s]   (cached)")
            except engine.ImageBuildError as exc:
                tail.append(_ANSI_RE.sub("", exc.detail).rstrip())
                raise EngineImageError(
                    f"build of {tag} failed at {last_step or 'start'}: {exc.detail.strip()}", list(tail)
                ) from exc
        if not engine.image_present(target, tag):
            raise EngineImageError(f"build of {tag} ended without an image", list(tail))
        progress(f"built {tag} in {time.monotonic() - started:.0f} s")
        return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmhub.fleet.images",
        description="Build (if missing) an LLMHub engine image and print its tag last.",
    )
    parser.add_argument("--recipe", default="vllm-cpu", help="directory under workers/images/")
    args = parser.parse_args(argv)
    try:
        tag = engine_image_ensure(recipe=args.recipe, progress=lambda line: print(line, flush=True))
    except (EngineImageError, engine.EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(tag, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
