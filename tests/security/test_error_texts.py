"""Gateway errors name no internal URL, address or host: a user of a failed deployment or of an engine
that breaks sees what to do, operators find the detail in the logs."""


import httpx
import pytest

from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, HostFactory, UserFactory, token_for
from tests.fakes.http import Handler, serve

pytestmark = pytest.mark.django_db(transaction=True)

INTERNAL = ["10.0.3.7", "tcp://", "http://", "unix://", "gpu-7.dc1.internal", "127.0.0.1", "/var/run/docker.sock",
            "172.17.0.2"]  # fmt: skip
FAIL_REASON = (
    "container exited with code 1 on gpu-7.dc1.internal (tcp://10.0.3.7:2376)\n"
    "RuntimeError: CUDA out of memory\n"
    "ConnectionError: http://172.17.0.2:8000/health refused; docker at unix:///var/run/docker.sock"
)


class BrokenEngine(Handler):
    """An engine that fails with its own addresses in the error, as a crashing server does."""

    def do_POST(self):  # noqa: N802
        self.read_body()
        self.reply(500, {"object": "error", "message": "Internal error at http://10.0.3.7:8000/v1 "
                         "(worker 172.17.0.2 died)", "code": 500})  # fmt: skip


def assert_no_internal_detail(text):
    leaked = [s for s in INTERNAL if s in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize("stream", [False, True])
def test_gateway_errors_name_no_internal_address(web, stream):
    user = UserFactory(username="curious")
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    failed = DeploymentFactory(user=user, model_name="failed", status="failed", fail_reason=FAIL_REASON)
    broken = DeploymentFactory(user=user, model_name="broken", status="running")
    engine = serve(BrokenEngine)
    Instance.objects.create(deployment=broken, host=HostFactory(address="127.0.0.1"), state="ready",
                            port=engine.server_address[1])  # fmt: skip
    url = f"{web.urls[0]}/v1/openai/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}

    failed_answer = httpx.post(url, json={**body, "model": failed.full_name}, headers=headers, timeout=10)
    broken_answer = httpx.post(url, json={**body, "model": broken.full_name}, headers=headers, timeout=10)
    engine.shutdown()

    assert failed_answer.status_code == 503 and "failed" in failed_answer.json()["error"]["message"]
    assert "CUDA out of memory" in failed_answer.json()["error"]["message"]  # what the user can act on stays
    assert_no_internal_detail(failed_answer.text)
    if stream:
        assert broken_answer.status_code == 200 and '"code": "engine_error"' in broken_answer.text
    else:
        assert broken_answer.status_code == 502 and broken_answer.json()["error"]["code"] == "engine_error"
    assert_no_internal_detail(broken_answer.text)
