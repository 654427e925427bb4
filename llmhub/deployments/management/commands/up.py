"""`manage.py up`: run LLMHub locally with a demo deployment, the README's first command.

Builds (or reuses) the CPU engine image, registers the local Docker Engine as a host, creates the
demo user and API token, starts web (uvicorn), worker, outbound worker and beat, creates `demo/tiny-llama`, shows
progress until it serves, sends one chat completion through the gateway, prints how to use it and
writes `.llmhub/demo.env`. Ctrl-C stops the processes it started; the data stays.
"""

import os
import secrets
import signal
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from llmhub import processes
from llmhub.accounts.models import User
from llmhub.accounts.services import api_token_authenticate, api_token_create
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_create, deployment_delete
from llmhub.fleet import engine, images
from llmhub.fleet.models import Instance
from llmhub.fleet.services import gpu_type_ensure, host_register

DEMO_USER = "demo"
DEMO_MODEL = "tiny-llama"
DEMO_REPO = "llmhub/tiny-random-llama"
DEMO_ENV = settings.STATE_DIR / "demo.env"
LOG_DIR = settings.STATE_DIR / "logs"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of `path` as a dict ({} when the file is missing)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


class Command(BaseCommand):
    help = "Run LLMHub (web, worker, outbound worker, beat) on the local Docker Engine with a demo deployment."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("LLMHUB_PORT", 8000)))
        parser.add_argument("--timeout", type=float, default=1200.0, help="Seconds to wait for the demo to serve.")

    def handle(self, *args, port, timeout, **options):
        self.supervisor = None
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # Ctrl-C must stop us even when started from a shell that ignores SIGINT for background jobs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        url = f"http://127.0.0.1:{port}"
        try:
            image = self.engine_image()
            user, password, token = self.demo_account()
            facts = {"LLMHUB_URL": url, "LLMHUB_USER": DEMO_USER, "LLMHUB_PASSWORD": password,
                     "LLMHUB_TOKEN": token, "LLMHUB_MODEL": f"{DEMO_USER}/{DEMO_MODEL}"}  # fmt: skip
            DEMO_ENV.write_text("".join(f"{k}={v}\n" for k, v in facts.items()))
            DEMO_ENV.chmod(0o600)
            gpu_type = gpu_type_ensure(name="CPU", hourly_price=Decimal("0.10"), uses_devices=False)
            host_register(
                name="local", docker_url="unix:///var/run/docker.sock", address="127.0.0.1",
                gpu_type=gpu_type, gpu_count=2, engine_image=image,
            )  # fmt: skip
            self.start_processes(port)
            deployment = self.demo_deployment(user, gpu_type)
            if not processes.wait_for_web(url):
                raise CommandError("The web server did not answer; see .llmhub/logs/web.log")
            reply = self.wait_until_serving(deployment, timeout, url, token)
            self.report(url, password, token, deployment.full_name, reply)
            self.serve_forever()
        except KeyboardInterrupt:
            self.stdout.write("\nStopping…")
        finally:
            if self.supervisor is not None:
                self.supervisor.stop()

    # --- steps -------------------------------------------------------------------------------

    def step(self, text):
        self.stdout.write(self.style.HTTP_INFO(f"==> {text}"))

    def engine_image(self) -> str:
        self.step("Engine image (vLLM CPU with the tiny demo model), built once per recipe hash")
        return images.engine_image_ensure(progress=lambda line: self.stdout.write(f"    {line}"))

    def demo_account(self) -> tuple[User, str, str]:
        """The demo user (a superuser, for the admin) with the password and token kept in demo.env."""
        saved = read_env_file(DEMO_ENV)
        password = saved.get("LLMHUB_PASSWORD") or secrets.token_urlsafe(12)
        user, _ = User.objects.get_or_create(username=DEMO_USER, defaults={"email": "demo@localhost"})
        user.set_password(password)
        user.is_staff = user.is_superuser = True
        user.save()
        token = saved.get("LLMHUB_TOKEN", "")
        if api_token_authenticate(token) != user:
            _, token = api_token_create(user=user, name="demo")
        return user, password, token

    def start_processes(self, port: int):
        self.step("Starting web, worker, outbound worker and beat (logs in .llmhub/logs/)")
        commands = processes.platform_commands(port=port, schedule=settings.STATE_DIR / "celerybeat-schedule")
        self.supervisor = processes.Supervisor(commands, log_dir=LOG_DIR, say=self.say_restart)
        self.supervisor.start()
        time.sleep(2)
        for name, child in self.supervisor.children.items():
            if child.poll() is not None:
                raise CommandError(f"{name} exited at start; see .llmhub/logs/{name}.log")

    def demo_deployment(self, user: User, gpu_type) -> Deployment:
        live = Deployment.objects.filter(user=user, model_name=DEMO_MODEL).exclude(status=Deployment.Status.DELETED)
        deployment = live.select_related("user").first()
        if deployment and deployment.status in (Deployment.Status.FAILED, Deployment.Status.DELETING):
            self.step(f"Replacing the {deployment.status} demo deployment")
            deployment_delete(deployment=deployment)
            while live.exists():
                time.sleep(1)
            deployment = None
        if deployment is None:
            self.step(f"Creating deployment {DEMO_USER}/{DEMO_MODEL} from {DEMO_REPO}")
            deployment = deployment_create(
                user=user, model_name=DEMO_MODEL, gpu_type=gpu_type, num_gpus=1, max_batch_size=8,
                hf_repo=DEMO_REPO, min_instances=1, max_instances=1,
            )  # fmt: skip
        else:
            self.step(f"Reusing deployment {deployment.full_name} ({deployment.status})")
        return deployment

    def wait_until_serving(self, deployment: Deployment, timeout: float, url: str, token: str) -> str:
        """Print the deployment's events as they happen until a chat completion through the gateway
        succeeds; return its reply. A reused deployment may still be replacing a stale instance."""
        self.step("Waiting for the instance to become ready (vLLM loads in about a minute on 2 cores)")
        started, seen, last_line = time.monotonic(), set(), ""
        while True:
            deployment.refresh_from_db()
            elapsed = time.monotonic() - started
            for event in deployment.events.order_by("created_at", "id").exclude(id__in=seen):
                seen.add(event.id)
                self.stdout.write(f"    [{elapsed:5.0f}s] {event.kind:<9} {event.message.splitlines()[0]}")
            line = self.engine_progress(deployment)
            if line and line != last_line:
                self.stdout.write(self.style.HTTP_NOT_MODIFIED(f"    [{elapsed:5.0f}s] engine    {line[:150]}"))
                last_line = line
            ready = deployment.instances.filter(state=Instance.State.READY).exists()
            if deployment.status == Deployment.Status.RUNNING and ready:
                reply = self.chat(url, token, deployment.full_name)
                if reply is not None:
                    return reply
            if deployment.status == Deployment.Status.FAILED:
                raise CommandError(f"The demo deployment failed:\n{deployment.fail_reason}")
            if time.monotonic() - started > timeout:
                raise CommandError(f"The demo deployment was not ready after {timeout:.0f} s; see .llmhub/logs/")
            self.supervisor.check()  # a process that exited meanwhile is restarted
            time.sleep(1)

    def engine_progress(self, deployment: Deployment) -> str:
        """The last line the starting engine logged (e.g. "Loading weights took 0.05 seconds"), or ''."""
        instance = deployment.instances.filter(state=Instance.State.STARTING).exclude(container_id="").first()
        if instance is None:
            return ""
        try:
            tail = engine.container_logs(instance.host.docker_url, instance.container_name, tail=1)
        except engine.EngineError:
            return ""
        return tail.strip().rsplit("\n", 1)[-1]

    def chat(self, url: str, token: str, model: str) -> str | None:
        """One chat completion through the gateway: the reply, or None while no instance can answer (502/503)."""
        self.step("Sending a chat completion through the gateway")
        response = httpx.post(
            f"{url}/v1/openai/chat/completions",
            headers={"Authorization": f"Bearer {token}"},
            json={"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}], "max_tokens": 24},
            timeout=120,
        )
        if response.status_code in (502, 503):
            self.stdout.write(f"    not yet: {response.json()['error']['message']}")
            return None
        if response.status_code != 200:
            raise CommandError(f"The gateway answered {response.status_code}: {response.text}")
        return response.json()["choices"][0]["message"]["content"]

    def report(self, url: str, password: str, token: str, model: str, reply: str):
        curl = (
            f"curl {url}/v1/openai/chat/completions \\\n"
            f"  -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n"
            f"""  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'"""
        )
        self.stdout.write(
            self.style.SUCCESS(f"\nReply from {model} (a tiny model with random weights):\n  {reply!r}\n")
        )
        self.stdout.write(
            f"Dashboard:  {url}/\n"
            f"Login:      {DEMO_USER} / {password}\n"
            f"API token:  {token}\n"
            f"Model:      {model}\n"
            f"Saved in:   {os.path.relpath(DEMO_ENV) if DEMO_ENV.is_relative_to(Path.cwd()) else DEMO_ENV}\n\n"
            f"Try it:\n{curl}\n\n"
            "Serving until Ctrl-C.\n"
        )

    def serve_forever(self):
        """Until Ctrl-C: a process that exits is restarted with backoff (`processes.Supervisor`)."""
        self.supervisor.run()

    def say_restart(self, line: str) -> None:
        self.stdout.write(self.style.WARNING(f"==> {line}"))
        self.stdout.flush()
