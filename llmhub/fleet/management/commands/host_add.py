"""`manage.py host_add NAME --docker-url URL --gpu-type TYPE --engine-image IMAGE`: register a GPU host.

Registration goes through `fleet.services.host_register` (the rules the admin form uses too): the
engine must answer; it is asked for its ID and the GPUs it advertises (dockerd ``--node-generic-resource
NVIDIA-GPU=<uuid>``); `--gpus` sets the count by hand for engines that advertise none. ``tcp://``
engines need Docker's TLS client files (``--tls-ca``, ``--tls-cert``, ``--tls-key``: the files
``docker --tlsverify`` uses). Running it again for the same name updates the host.

Engine ports are published on ``--bind-address`` only: 127.0.0.1 (the default) for a ``unix://`` engine
on the gateway's machine; for a ``tcp://`` engine it must be given: the IP of the host's private
interface that the gateway reaches (never 0.0.0.0, never a public address). ``--address`` is what the
gateway dials (default: the bind address), e.g. a DNS name that resolves to it.
"""

from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from llmhub.fleet import engine
from llmhub.fleet.models import GpuType
from llmhub.fleet.services import host_register

OPTIONS = {
    "docker_url": "--docker-url",
    "address": "--address",
    "bind_address": "--bind-address",
    "gpu_count": "--gpus",
    "engine_image": "--engine-image",
}  # host_register's error keys, as options


def _read(option: str, path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"{option}: cannot read {path}: {exc.strerror}") from exc


class Command(BaseCommand):
    help = "Register (or update) a GPU host: its Docker Engine, the address the gateway reaches it by, its GPUs."

    def add_arguments(self, parser):
        parser.add_argument("name", help="host name, e.g. gpu-1")
        parser.add_argument("--docker-url", required=True, help="unix:///var/run/docker.sock or tcp://host:2376")
        parser.add_argument(
            "--bind-address",
            help="IP engine ports are published on: a private interface the gateway reaches "
            "(default 127.0.0.1 for unix:// engines; required for tcp:// engines)",
        )
        parser.add_argument(
            "--address", help="IP or DNS name the gateway reaches published ports by (default: the bind address)"
        )
        parser.add_argument("--gpu-type", required=True, help="name of an existing GPU type, e.g. H100-80GB")
        parser.add_argument("--gpus", type=int, help="GPU count, when the engine does not advertise its GPUs")
        parser.add_argument(
            "--engine-image", required=True, help="image instances run from, e.g. vllm/vllm-openai:v0.10.0"
        )
        parser.add_argument("--tls-ca", help="CA certificate (PEM file) of a tcp:// engine")
        parser.add_argument("--tls-cert", help="client certificate (PEM file)")
        parser.add_argument("--tls-key", help="client key (PEM file); stored encrypted")

    def handle(
        self, *args, name, docker_url, address, bind_address, gpu_type, gpus, engine_image, tls_ca, tls_cert, tls_key,
        **opts,
    ):  # fmt: skip
        kind = GpuType.objects.filter(name=gpu_type).first()
        if kind is None:
            known = ", ".join(GpuType.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"Unknown GPU type '{gpu_type}' (known: {known}). Create it in the admin first.")
        tls = None
        if tls_ca or tls_cert or tls_key:
            if not (tls_ca and tls_cert and tls_key):
                raise CommandError("TLS needs all three of --tls-ca, --tls-cert and --tls-key.")
            tls = engine.TlsCredentials(
                ca_cert=_read("--tls-ca", tls_ca),
                client_cert=_read("--tls-cert", tls_cert),
                client_key=_read("--tls-key", tls_key),
            )
        if bind_address is None:
            if docker_url.strip().startswith("tcp://"):
                raise CommandError(
                    "--bind-address: give the IP of the host's private interface that the gateway reaches; engine "
                    "ports are published there only (never on 0.0.0.0 or a public address)."
                )
            bind_address = "127.0.0.1"
        try:
            host = host_register(
                name=name, docker_url=docker_url, address=bind_address if address is None else address,
                gpu_type=kind, engine_image=engine_image, gpu_count=gpus, tls=tls, bind_address=bind_address,
            )  # fmt: skip
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{OPTIONS.get(field, field)}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items())
            ) from exc
        source = "set by hand" if gpus is not None else "advertised by the engine"
        self.stdout.write(
            f"Host {host.name}: {host.docker_url}, reached at {host.address}, "
            f"engine ports published on {host.bind_address}, "
            f"{host.gpu_count} × {kind.name} ({source}), engine image {host.engine_image}, state {host.state}."
        )
