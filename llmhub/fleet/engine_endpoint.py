"""Where a Docker Engine answers and how LLMHub reaches it (part of the engine seam; `engine` re-exports
these names): `Endpoint` (``unix:///path`` or ``tcp://host:port`` + Docker's ``--tlsverify`` client
certificates), URL checks, the private files docker-py reads TLS client material from, the cached
client of an engine (`client_for`) and `engine_call`, which turns docker-py's and requests' failures
into `EngineError` / `EngineUnreachable`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import docker
import docker.constants
import docker.tls
import requests
from docker.errors import APIError, DockerException

CALL_TIMEOUT_S = 15  # one API call: inspect, list, create, start, remove, logs

DEFAULT_TLS_PORT = 2376  # Docker's registered port for its API over TLS
TLS_DIR_NAME = "engine-tls"  # under settings.STATE_DIR: decrypted TLS client material, mode 0700


class EngineError(Exception):
    """A host's Docker Engine refused or failed a request."""


class EngineUnreachable(EngineError):
    """A host's Docker Engine did not answer (connection refused or reset, timeout, TLS failure)."""


@dataclass(frozen=True)
class TlsCredentials:
    """PEM texts for Docker's TLS client authentication (``--tlsverify``): the CA that signed the
    engine's server certificate, and the client certificate and key the engine trusts."""

    ca_cert: str
    client_cert: str
    client_key: str

    def fingerprint(self) -> str:
        """sha256 over the three PEM texts: 16 hex chars, a cache key that never contains the key."""
        digest = hashlib.sha256("\0".join((self.ca_cert, self.client_cert, self.client_key)).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Endpoint:
    """Where a Docker Engine answers: ``unix:///var/run/docker.sock`` or ``tcp://host:port`` (+ TLS)."""

    url: str
    tls: TlsCredentials | None = None

    def __str__(self) -> str:
        return self.url


def endpoint_of(target: Endpoint | str) -> Endpoint:
    """`target` as an Endpoint (a URL string means no TLS)."""
    return target if isinstance(target, Endpoint) else Endpoint(url=target)


def local_engine() -> str:
    """The URL of this machine's own Docker Engine, as the ``docker`` CLI finds it: ``$DOCKER_HOST``, else
    ``unix:///var/run/docker.sock``."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def url_validate(url: str, *, tls: bool = False) -> str:
    """Check a Docker Engine URL and return it normalised (``tcp://host`` gets port 2376).

    Accepted: ``unix:///absolute/path.sock`` and ``tcp://host[:port]`` (`tls` must then be True:
    Docker's API over TCP without TLS client certificates gives root on the host to anyone who can
    connect). Raises ValueError with a message an operator can act on.
    """
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = url[len("unix://") :]
        if not path.startswith("/") or parts.query or parts.fragment:
            raise ValueError(f"'{url}' is not a unix socket URL: write unix:///absolute/path/to/docker.sock")
        return url
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"'{url}' has a bad port: write tcp://host:port, e.g. tcp://gpu-1.internal:2376") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError(f"'{url}' is not an engine address: write tcp://host:port, e.g. tcp://gpu-1.internal:2376")
        if not tls:
            raise ValueError(
                f"'{url}' is reached over TCP: give the TLS client certificates of the engine's --tlsverify "
                "set-up (an engine reached over tcp:// needs the TLS CA, client certificate and client key; "
                "without TLS it is open to anyone)"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"tcp://{host}:{port or DEFAULT_TLS_PORT}"
    raise ValueError(f"'{url}' is not a Docker Engine URL: use unix:///path/to/docker.sock or tcp://host:port")


def _private_dir(path: str) -> str:
    """Create `path` (mode 0700) if missing; refuse one owned by someone else or open to group or others."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise EngineError(f"{path} is not a directory: remove it (it should hold Docker TLS client files)")
    if info.st_uid != os.getuid():
        raise EngineError(f"{path} is owned by uid {info.st_uid}, not this process's ({os.getuid()}): refusing to "
                          "keep Docker TLS client keys there")  # fmt: skip
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise EngineError(f"{path} is open to group or others (mode {stat.S_IMODE(info.st_mode):o}): "
                          "chmod 700 it or remove it")  # fmt: skip
    return path


def tls_config(tls: TlsCredentials) -> docker.tls.TLSConfig:
    """A TLSConfig reading the PEMs from private files (mode 0600) named by their fingerprint, in
    ``<settings.STATE_DIR>/engine-tls/<fingerprint>/`` (directories 0700, owned by this process's user).

    Raises EngineError when a directory on the way is owned by someone else or open to group or others.
    """
    from django.conf import settings

    base = _private_dir(os.path.join(str(settings.STATE_DIR), TLS_DIR_NAME))
    directory = _private_dir(os.path.join(base, tls.fingerprint()))
    paths = {}
    for name, text in (("ca.pem", tls.ca_cert), ("cert.pem", tls.client_cert), ("key.pem", tls.client_key)):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(path + ".tmp", path)
        paths[name] = path
    return docker.tls.TLSConfig(client_cert=(paths["cert.pem"], paths["key.pem"]), ca_cert=paths["ca.pem"], verify=True)


_clients: dict[tuple[str, str, int], docker.DockerClient] = {}
_clients_lock = threading.Lock()


def client_for(target: Endpoint | str, *, timeout: int = CALL_TIMEOUT_S) -> docker.DockerClient:
    """A cached Docker client for `target` whose calls give up after `timeout` seconds.

    Raises EngineUnreachable when the engine cannot be reached to agree on an API version, EngineError
    when the TLS material is unusable.
    """
    endpoint = endpoint_of(target)
    key = (endpoint.url, endpoint.tls.fingerprint() if endpoint.tls else "", timeout)
    with _clients_lock:
        client = _clients.get(key)
    if client is not None:
        return client
    with engine_call(f"connecting to Docker Engine at {endpoint.url}"):
        try:
            tls = tls_config(endpoint.tls) if endpoint.tls else False
        except EngineError:
            raise
        except (OSError, docker.errors.TLSParameterError) as exc:
            raise EngineError(f"the TLS certificates for {endpoint.url} are unusable: {exc}") from exc
        # The API version is the engine's own (as docker-py's "auto"), asked for by a session that does
        # not trust the environment: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the
        # engine's CA on every request otherwise, and TLS to the engine fails on machines that set them.
        probe = docker.APIClient(
            base_url=endpoint.url, tls=tls, timeout=timeout, version=docker.constants.DEFAULT_DOCKER_API_VERSION
        )
        probe.trust_env = False
        try:
            api_version = probe.version(api_version=False)["ApiVersion"]
        finally:
            probe.close()
        client = docker.DockerClient(base_url=endpoint.url, tls=tls, timeout=timeout, version=api_version)
        client.api.trust_env = False
    with _clients_lock:
        _clients.setdefault(key, client)
        return _clients[key]


@contextlib.contextmanager
def engine_call(what: str) -> Iterator[None]:
    """Turn docker-py and requests failures into EngineError / EngineUnreachable naming `what`."""
    try:
        yield
    except EngineError:
        raise
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError) as exc:
        raise EngineUnreachable(f"{what}: the engine did not answer ({exc})") from exc
    except APIError as exc:
        raise EngineError(f"{what} failed: {exc.explanation or exc}") from exc
    except (DockerException, requests.exceptions.RequestException, OSError) as exc:
        if "connection" in str(exc).lower() or "timed out" in str(exc).lower():
            raise EngineUnreachable(f"{what}: the engine did not answer ({exc})") from exc
        raise EngineError(f"{what} failed: {exc}") from exc
