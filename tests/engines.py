"""Several Docker Engines on one machine, as separate GPU hosts for the fleet tests.

Each `Dockerd` is its own ``dockerd`` process with its own socket, data root, exec root, pid file,
cgroup parent, containerd namespace, bridge (a /24 of 10.231.0.0/16) and address pool for the networks
it makes (a /24 of 10.232.0.0/16, removed with it; ``--iptables=false``, so it
leaves the machine's main engine's rules alone; published ports go through docker-proxy). A host may
advertise GPUs (``--node-generic-resource NVIDIA-GPU=<id>``), as GPU hosts are set up for `host_add`,
and accept NVIDIA device requests: dockerd registers its "nvidia" device driver when a program
named ``nvidia-container-runtime-hook`` is on its PATH, and then hands a container the requested
device IDs as ``NVIDIA_VISIBLE_DEVICES`` and calls that hook before it starts. Here the hook is a
script that records the request and lets the container start, so a GPU host's engine can be
checked through what it received. A host may listen on ``tcp://`` with TLS client authentication
(``--tlsverify``; certificates made with `cryptography`), and may keep containers across its own
restarts (``--live-restore``).

`FakeRegistry` serves images saved from the main engine over the Docker Registry HTTP API v2 on
127.0.0.1 (which Docker treats as an insecure registry, so plain HTTP), for real pulls with progress.
Needs root, ``ip`` (iproute2) and ``dockerd``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmhub.fleet import engine

GPU = "H100-80GB"  # the GPU type the fleet tests' hosts have

NVIDIA_HOOK = """#!/bin/sh
# Stand-in for NVIDIA's OCI prestart hook: record the container state dockerd passes, start it.
cat >> "{log}"
echo >> "{log}"
exit 0
"""


def _default_bridge_address() -> str | None:
    """The machine's engine's default bridge (docker0) address, e.g. "172.17.0.1/16", or None without one."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "docker0"], capture_output=True, text=True)
    fields = shown.stdout.split()
    return fields[fields.index("inet") + 1] if "inet" in fields else None


DEFAULT_BRIDGE = _default_bridge_address()


def default_bridge_kept() -> None:
    """Put back the machine's engine's default bridge (docker0) when an extra engine's start or stop took it
    away (seen with these fleet tests: the machine's engine then fails every container on its default
    network with "could not find bridge docker0"); the engine finds a bridge by name, so one made anew serves."""
    if DEFAULT_BRIDGE is None or _default_bridge_address() is not None:
        return
    subprocess.run(["ip", "link", "add", "name", "docker0", "type", "bridge"], capture_output=True)
    subprocess.run(["ip", "addr", "replace", DEFAULT_BRIDGE, "dev", "docker0"], capture_output=True)
    subprocess.run(["ip", "link", "set", "docker0", "up"], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unmount_under(path: Path) -> None:
    """Unmount every mount point at or below `path`, deepest first (lazily, so a busy one goes too)."""
    prefix = str(path).rstrip("/")
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4].replace("\\040", " ") for line in fh]
    for point in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


class Tls:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `directory`."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmhub test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self._leaf(ca, ca_key, "server", ExtendedKeyUsageOID.SERVER_AUTH, now)
        self.client_cert, self.client_key = self._leaf(ca, ca_key, "client", ExtendedKeyUsageOID.CLIENT_AUTH, now)
        # A client certificate from a CA the engine does not trust.
        other_key = ec.generate_private_key(ec.SECP256R1())
        other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
        other = (
            x509.CertificateBuilder()
            .subject_name(other_name)
            .issuer_name(other_name)
            .public_key(other_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(other_key, hashes.SHA256())
        )
        self.untrusted_cert, self.untrusted_key = self._leaf(
            other, other_key, "untrusted", ExtendedKeyUsageOID.CLIENT_AUTH, now
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def _leaf(self, ca, ca_key, name, usage, now) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return (
            self._write(f"{name}-cert.pem", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{name}-key.pem", key_pem),
        )

    def credentials(self, *, trusted: bool = True) -> engine.TlsCredentials:
        cert, key = (self.client_cert, self.client_key) if trusted else (self.untrusted_cert, self.untrusted_key)
        return engine.TlsCredentials(
            ca_cert=self.ca.read_text(), client_cert=cert.read_text(), client_key=key.read_text()
        )


class Dockerd:
    """One extra Docker Engine, started and stopped by the tests (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        base: Path,
        index: int,
        address: str,
        gpus: int = 0,
        tls: bool = False,
        live_restore: bool = False,
    ):
        self.name, self.base, self.address, self.gpus = name, base, address, gpus
        tag = f"{os.getpid() % 100000}{index}"
        self.bridge = f"lhf{tag}"[:15]
        self.subnet_octet = 10 + (os.getpid() % 40) * 5 + index
        self.exec_root = Path(f"/run/lhf-{tag}")
        self.socket = base / "docker.sock"
        self.hook_log = base / "nvidia-hook.log"
        self.tls = Tls(base / "tls") if tls else None
        self.port = free_port() if tls else None
        self.live_restore = live_restore
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The URL LLMHub uses: tcp:// (TLS) or the unix socket."""
        return f"tcp://127.0.0.1:{self.port}" if self.tls else f"unix://{self.socket}"

    @property
    def endpoint(self) -> engine.Endpoint:
        return engine.Endpoint(url=self.url, tls=self.tls.credentials() if self.tls else None)

    def client(self, timeout: int = 120) -> docker.DockerClient:
        """A client over the unix socket (always open, TLS or not), for test set-up and checks."""
        return docker.DockerClient(base_url=f"unix://{self.socket}", timeout=timeout, version="auto")

    def _argv(self) -> list[str]:
        argv = [
            "dockerd",
            "--data-root", str(self.base / "data"),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.base / "dockerd.pid"),
            "-H", f"unix://{self.socket}",
            "--bridge", self.bridge,
            "--iptables=false", "--ip-masq=false",
            "--cgroup-parent", self.bridge,
            "--containerd-namespace", self.bridge,
            "--containerd-plugins-namespace", f"{self.bridge}p",
            "--shutdown-timeout", "5",
            # Its own networks (the engines' bridge network) come from 10.232.<octet>.0/24, never from the
            # 172.17-31/192.168 pools the machine's own engine and its other networks take.
            "--default-address-pool", f"base=10.232.{self.subnet_octet}.0/24,size=28",
        ]  # fmt: skip
        for i in range(self.gpus):
            argv += ["--node-generic-resource", f"NVIDIA-GPU=GPU-{self.name}-{i}"]
        if self.tls:
            argv += [
                "-H", f"tcp://127.0.0.1:{self.port}", "--tlsverify", "--tlscacert", str(self.tls.ca),
                "--tlscert", str(self.tls.server_cert), "--tlskey", str(self.tls.server_key),
            ]  # fmt: skip
        if self.live_restore:
            argv.append("--live-restore")
        return argv

    def start(self, timeout: float = 60) -> None:
        """Start dockerd (same data root as before when restarted); returns once it answers."""
        self.base.mkdir(parents=True, exist_ok=True)
        default_bridge_kept()
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], capture_output=True)
        subprocess.run(
            ["ip", "addr", "replace", f"10.231.{self.subnet_octet}.1/24", "dev", self.bridge], check=True, capture_output=True
        )  # fmt: skip
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True, capture_output=True)
        bin_dir = self.base / "bin"
        bin_dir.mkdir(exist_ok=True)
        hook = bin_dir / "nvidia-container-runtime-hook"
        hook.write_text(NVIDIA_HOOK.format(log=self.hook_log))
        hook.chmod(0o755)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        log = open(self.base / "dockerd.log", "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            self._argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd {self.name} exited; see {self.base / 'dockerd.log'}")
            try:
                if self.client(timeout=5).ping():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        raise RuntimeError(f"dockerd {self.name} did not answer in {timeout:.0f} s; see {self.base / 'dockerd.log'}")

    def stop(self, timeout: float = 60) -> None:
        """Stop dockerd as an operator would (SIGTERM): without live-restore its containers stop with it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        default_bridge_kept()

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop dockerd, kill what it left, remove its bridge, exec root and data root."""
        client = None
        if self.process is not None and self.process.poll() is None:
            try:
                client = self.client(timeout=30)
                for container in client.containers.list(all=True):
                    container.remove(force=True)
                client.networks.prune()  # their bridges live in the machine's namespace, past the data root
            except Exception:  # noqa: BLE001 - best effort before the stop
                pass
        self.stop()
        if client is not None:
            client.close()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for path in (self.exec_root, self.base):
            unmount_under(path)  # e.g. overlay2's private bind mount, kept by a --live-restore engine
            shutil.rmtree(path, ignore_errors=True)

    def load(self, source: docker.DockerClient, image: str) -> None:
        """Copy `image` from `source` (the main engine) into this engine: ``docker save | docker load``."""
        client = self.client(timeout=600)
        try:
            client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        client.images.load(source.images.get(image).save(named=True))
        client.images.get(image)

    def hook_calls(self) -> list[dict]:
        """The OCI states the NVIDIA hook received (one per container started with a device request)."""
        if not self.hook_log.exists():
            return []
        return [json.loads(line) for line in self.hook_log.read_text().splitlines() if line.strip()]


class FakeRegistry:
    """Docker Registry HTTP API v2, read-only, serving images saved from the main engine (layers
    uncompressed, blobs on disk under `directory`).

    `blob_downloads` counts blob GETs. `start()` / `stop()`; `add()` returns the reference to pull,
    e.g. ``127.0.0.1:40123/llmhub/fake-engine:<hash>``.
    """

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[str, Path] = {}
        self.blob_downloads = 0
        self.server: ThreadingHTTPServer | None = None

    def _blob(self, data_chunks) -> str:
        digest = hashlib.sha256()
        tmp = self.dir / "incoming"
        with open(tmp, "wb") as fh:
            for chunk in data_chunks:
                digest.update(chunk)
                fh.write(chunk)
        name = "sha256:" + digest.hexdigest()
        path = self.dir / name.replace(":", "-")
        tmp.replace(path)
        self.blobs[name] = path
        return name

    def add(self, source: docker.DockerClient, image: str, *, name: str, tag: str) -> str:
        """Serve `image` of `source` as `name:tag`; returns the reference to pull."""
        saved_tar = self.dir / "saved.tar"
        with open(saved_tar, "wb") as fh:
            for chunk in source.images.get(image).save(named=True):
                fh.write(chunk)
        layers = []
        with tarfile.open(saved_tar) as archive:
            saved = json.load(archive.extractfile("manifest.json"))[0]
            config = archive.extractfile(saved["Config"]).read()
            for member in saved["Layers"]:
                layer = archive.extractfile(member)
                digest = self._blob(iter(functools.partial(layer.read, 1 << 20), b""))
                size = self.blobs[digest].stat().st_size
                layers.append({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": size, "digest": digest})  # fmt: skip
        saved_tar.unlink()
        config_digest = self._blob([config])
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": config_digest,
            },  # fmt: skip
            "layers": layers,
        }
        body = json.dumps(manifest).encode()
        self.manifests[(name, tag)] = body
        self.manifests[(name, "sha256:" + hashlib.sha256(body).hexdigest())] = body
        return f"127.0.0.1:{self.port}/{name}:{tag}"

    def start(self) -> None:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def head(self, status, length, content_type="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()

            def route(self, only_head):
                parts = self.path.split("/")
                if self.path == "/v2/":
                    self.head(200, 2)
                    return None if only_head else self.wfile.write(b"{}")
                if len(parts) >= 5 and parts[1] == "v2" and parts[-2] == "manifests":
                    body = registry.manifests.get(("/".join(parts[2:-2]), parts[-1]))
                    if body is not None:
                        digest = "sha256:" + hashlib.sha256(body).hexdigest()
                        self.head(200, len(body), "application/vnd.docker.distribution.manifest.v2+json",
                                  {"Docker-Content-Digest": digest})  # fmt: skip
                        return None if only_head else self.wfile.write(body)
                if len(parts) >= 5 and parts[1] == "v2" and parts[-2] == "blobs" and parts[-1] in registry.blobs:
                    path = registry.blobs[parts[-1]]
                    self.head(
                        200, path.stat().st_size, "application/octet-stream", {"Docker-Content-Digest": parts[-1]}
                    )
                    if not only_head:
                        registry.blob_downloads += 1
                        with open(path, "rb") as fh:
                            shutil.copyfileobj(fh, self.wfile, 1 << 20)
                    return None
                body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}).encode()
                self.head(404, len(body))
                return None if only_head else self.wfile.write(body)

            def do_GET(self):
                self.route(False)

            def do_HEAD(self):
                self.route(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def register(dockerd: Dockerd, gpu_type, *, image: str, state: str = "ready"):
    """A Host row for `dockerd` (its URL, TLS credentials, address and GPU count)."""
    from llmhub import crypto
    from tests.factories import HostFactory

    tls = dockerd.endpoint.tls
    return HostFactory(
        name=dockerd.name, docker_url=dockerd.url, address=dockerd.address, bind_address=dockerd.address,
        gpu_type=gpu_type, gpu_count=dockerd.gpus,
        engine_image=image, state=state,
        tls_ca_cert=tls.ca_cert if tls else "", tls_client_cert=tls.client_cert if tls else "",
        tls_client_key_encrypted=crypto.encrypt(tls.client_key) if tls else "",
    )  # fmt: skip


def containers(dockerd: Dockerd) -> list:
    """This installation's containers on `dockerd` (LLMHUB_CONTAINER_PREFIX), running or not."""
    from django.conf import settings

    labels = [engine.LABEL_INSTANCE, f"{engine.LABEL_INSTALLATION}={settings.CONTAINER_PREFIX}"]
    return dockerd.client().containers.list(all=True, filters={"label": labels})
