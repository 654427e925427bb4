"""Changed LoRA adapters reach running instances: loaded and unloaded at run time where the engine
accepts it, else the instance is replaced make-before-break (engine seam and vLLM client stubbed)."""

import pytest

from llmhub.fleet import adapters, reconcile
from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, UserFactory

pytestmark = pytest.mark.django_db

TINY = {"name": "tiny", "repo": "llmhub/tiny-random-llama-lora"}
SQL = {"name": "sql", "repo": "acme/sql-lora"}


class Engines:
    """vLLM's model list and LoRA endpoints, per instance base URL; `refuse` answers every load with 404."""

    def __init__(self, monkeypatch, base: str):
        self.base, self.models, self.refuse, self.calls = base, {}, False, []
        monkeypatch.setattr(adapters.vllm, "served_models", self.served_models)
        monkeypatch.setattr(adapters.vllm, "lora_load", self.lora_load)
        monkeypatch.setattr(adapters.vllm, "lora_unload", self.lora_unload)

    def served_models(self, base_url, *, key, timeout):
        assert key and timeout > 0
        return [self.base, *self.models.setdefault(base_url, [])]

    def lora_load(self, base_url, *, key, name, path, timeout):
        assert key and timeout > 0
        self.calls.append(("load", name, path))
        if self.refuse:
            return False
        self.models.setdefault(base_url, []).append(name)
        return True

    def lora_unload(self, base_url, *, key, name, timeout):
        self.calls.append(("unload", name))
        self.models[base_url].remove(name)
        return True


def running(cpu_host, lora_adapters):
    deployment = DeploymentFactory(
        user=UserFactory(username="bob"), model_name="x", gpu_type=cpu_host.gpu_type, lora_adapters=lora_adapters
    )
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    (instance,) = Instance.objects.filter(deployment=deployment, state="ready")
    return deployment, instance


def test_a_ready_instance_loads_added_and_unloads_removed_adapters_at_run_time(fake, cpu_host, monkeypatch):
    deployment, instance = running(cpu_host, [TINY])
    engines = Engines(monkeypatch, "bob/x")
    engines.models[instance.base_url] = ["bob/x:tiny"]

    deployment.lora_adapters = [SQL]
    deployment.save()
    done = adapters.instances_adapters_apply(deployment_id=deployment.id)

    assert done.updated == [instance.id] and done.replaced == []
    assert engines.calls == [("load", "bob/x:sql", "acme/sql-lora"), ("unload", "bob/x:tiny")]
    assert engines.models[instance.base_url] == ["bob/x:sql"]
    instance.refresh_from_db()
    assert instance.replace_requested_at is None
    assert len(fake.runs) == 1  # nothing restarted


def test_an_instance_that_refuses_is_replaced_before_it_stops(fake, cpu_host, monkeypatch):
    # Started without adapters, so vLLM runs without --enable-lora and has no load endpoint.
    deployment, old = running(cpu_host, [])
    engines = Engines(monkeypatch, "bob/x")
    engines.refuse = True

    deployment.lora_adapters = [TINY]
    deployment.save()
    done = adapters.instances_adapters_apply(deployment_id=deployment.id)

    assert done.updated == [] and done.replaced == [old.id]
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # the replacement starts; the old one serves
    states = dict(Instance.objects.filter(deployment=deployment).values_list("id", "state"))
    assert states[old.id] == "ready" and sorted(states.values()) == ["ready", "starting"]
    new_spec = fake.runs[-1]
    assert "bob/x:tiny=llmhub/tiny-random-llama-lora" in new_spec.args

    reconcile.deployment_reconcile(deployment_id=deployment.id)  # replacement ready → the old one stops
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    states = dict(Instance.objects.filter(deployment=deployment).values_list("id", "state"))
    assert states[old.id] == "stopped" and sorted(states.values()) == ["ready", "stopped"]
    assert deployment.events.filter(kind="replaced").exists()
    (new,) = Instance.objects.filter(deployment=deployment, state="ready")
    engines.models[new.base_url] = ["bob/x:tiny"]  # served from its command line
    assert adapters.instances_adapters_apply(deployment_id=deployment.id).updated == [new.id]  # settled
    assert engines.calls == [("load", "bob/x:tiny", "llmhub/tiny-random-llama-lora")]


def test_an_engine_that_does_not_answer_is_replaced_and_a_deleted_deployment_is_left_alone(fake, cpu_host, monkeypatch):
    deployment, old = running(cpu_host, [TINY])
    monkeypatch.setattr(adapters.vllm, "served_models", lambda base_url, *, key, timeout: [])

    assert adapters.instances_adapters_apply(deployment_id=deployment.id).replaced == [old.id]

    deployment.status = "deleted"
    deployment.save()
    assert adapters.instances_adapters_apply(deployment_id=deployment.id).replaced == []
