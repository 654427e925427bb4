"""What one tenant could learn or take through shared state: the model-fit cache must not tell another
user that a private repo exists or how big it is, and a deployment being deleted keeps counting against the
GPU quota until its instances have stopped."""

import json
import uuid
from pathlib import Path

import huggingface_hub
import pytest
from django.core.cache import cache

from llmhub.deployments import services
from llmhub.deployments.fit import GB, model_facts
from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, token_for

pytestmark = pytest.mark.django_db


def weights_gb(repo: str, revision: str, token: str) -> float | None:
    """GB of the weights as stored, as the fit estimate learns them with `token` (None: unknown to it)."""
    facts = model_facts(repo, revision, token)
    return None if facts is None else facts.stored_bytes / GB

ALICE_HF_TOKEN = "hf_alicesPrivateToken0123456789"


@pytest.fixture
def private_repo(monkeypatch, settings):
    """A private repo on a stand-in hub: its safetensors metadata (8 B bf16 parameters) answers only
    ALICE_HF_TOKEN; no config.json anywhere."""
    settings.HF_HUB_OFFLINE = False
    repo = f"alice-corp/secret-{uuid.uuid4().hex[:8]}"

    def metadata(repo_id, revision=None, token=None, timeout=None, **kwargs):
        if repo_id != repo or token != ALICE_HF_TOKEN:
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error: Repository Not Found")
        return type("Meta", (), {"parameter_count": {"BF16": 8_000_000_000}})()

    def no_config(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("no config.json")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_config)
    return repo


def test_another_user_does_not_learn_a_private_repos_size_from_the_cache(private_repo):
    assert weights_gb(private_repo, "", ALICE_HF_TOKEN) == pytest.approx(16.0)  # alice, with her token

    assert weights_gb(private_repo, "", "") is None  # bob, no token: unknown, as the hub says
    assert weights_gb(private_repo, "", "hf_bobsOwnToken") is None


def test_the_cache_key_holds_no_token(private_repo):
    weights_gb(private_repo, "", ALICE_HF_TOKEN)

    keys = [key.decode() for key in cache._cache.get_client().keys("*")]
    assert any(private_repo in key for key in keys)
    assert not any(ALICE_HF_TOKEN in key or "alicesPrivate" in key for key in keys)


def test_the_deploy_api_warns_another_user_that_the_size_is_unknown(client, user, other_user, private_repo):
    HostFactory(gpu_type=GpuTypeFactory(name="T4-16GB", memory_gb=16, uses_devices=True), gpu_count=4)

    def create(owner, name, token):
        body = {"model_name": name, "gpu": "T4-16GB", "num_gpus": 1, "max_batch_size": 8,
                "hf": {"repo": private_repo, "token": token}, "settings": {"min_instances": 1, "max_instances": 1}}  # fmt: skip
        return client.post("/deploy/llm", json.dumps(body), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token_for(owner)}")  # fmt: skip

    alice = create(user, "a", ALICE_HF_TOKEN)
    bob = create(other_user, "b", "")

    assert alice.status_code == 400 and "16.0 GB of weights" in alice.json()["errors"]["num_gpus"][0]
    assert bob.status_code == 200 and "could not be read" in bob.json()["warnings"][0]


def test_a_deployment_being_deleted_counts_against_the_quota_until_its_instances_stop(user):
    cpu = GpuTypeFactory(name="CPU")
    host = HostFactory(gpu_type=cpu, gpu_count=8)
    old = DeploymentFactory(user=user, gpu_type=cpu, num_gpus=2, max_instances=2, status="running")
    instance = Instance.objects.create(deployment=old, host=host, gpu_indexes=[0, 1], state="ready", port=40000)
    services.deployment_delete(deployment=old)

    with pytest.raises(services.ValidationError) as refused:
        services.deployment_create(user=user, model_name="new", gpu_type=cpu, num_gpus=1, max_batch_size=8,
                                   hf_repo="acme/m", max_instances=1)  # fmt: skip
    assert "only 0 of your quota of 4 are free" in str(refused.value)

    Instance.objects.filter(id=instance.id).update(state="stopping")
    with pytest.raises(services.ValidationError):
        services.deployment_create(user=user, model_name="new", gpu_type=cpu, num_gpus=1, max_batch_size=8,
                                   hf_repo="acme/m", max_instances=1)  # fmt: skip

    Instance.objects.filter(id=instance.id).update(state="stopped")
    created = services.deployment_create(user=user, model_name="new", gpu_type=cpu, num_gpus=4, max_batch_size=8,
                                         hf_repo="acme/m", max_instances=1)  # fmt: skip
    assert created.status == "deploying"


def test_a_config_downloaded_with_a_token_is_not_left_where_others_read_it(monkeypatch, settings, tmp_path):
    """The web's Hugging Face cache is shared by every user's estimates: what was fetched with alice's token
    (a private repo's config.json) must not be found there by bob's estimate once the cached size expires."""
    settings.HF_HUB_OFFLINE, settings.HF_CACHE_DIR = False, str(tmp_path / "hf")
    repo = f"alice-corp/secret-{uuid.uuid4().hex[:8]}"
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16"}  # fmt: skip

    def download(repo_id, filename, revision=None, token=None, cache_dir=None, local_files_only=False, **kwargs):
        """The hub's download into `cache_dir` (its layout simplified): private, readable with alice's token."""
        path = Path(cache_dir or tmp_path / "default") / repo_id.replace("/", "--") / filename
        if local_files_only:
            if not path.exists():
                raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
            return str(path)
        if token != ALICE_HF_TOKEN:
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error: Repository Not Found")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return str(path)

    def no_safetensors_metadata(*args, **kwargs):
        raise huggingface_hub.errors.NotASafetensorsRepoError("no safetensors metadata")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", no_safetensors_metadata)

    assert weights_gb(repo, "", ALICE_HF_TOKEN) == pytest.approx(16.06, abs=0.01)
    client = cache._cache.get_client()
    client.delete(*client.keys("*fit:weights:*"))  # the cached sizes expire
    assert weights_gb(repo, "", "") is None
