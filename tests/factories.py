"""factory_boy factories for the models tests build on."""

from decimal import Decimal

import factory

from llmhub.accounts.models import User
from llmhub.accounts.services import api_token_create
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import GpuType, Host, Instance


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw-for-tests")


class GpuTypeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = GpuType
        django_get_or_create = ("name",)

    name = "CPU"
    memory_gb = 0
    hourly_price = Decimal("0.10")
    uses_devices = False


class HostFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Host

    name = factory.Sequence(lambda n: f"host{n}")
    docker_url = "unix:///var/run/docker.sock"
    address = "127.0.0.1"
    gpu_type = factory.SubFactory(GpuTypeFactory)
    gpu_count = 2
    engine_image = "llmhub/vllm-cpu:test"


class DeploymentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Deployment

    user = factory.SubFactory(UserFactory)
    model_name = factory.Sequence(lambda n: f"model-{n}")
    gpu_type = factory.SubFactory(GpuTypeFactory)
    num_gpus = 1
    max_batch_size = 8
    hf_repo = "llmhub/tiny-random-llama"
    min_instances = 1
    max_instances = 1


class InstanceFactory(factory.django.DjangoModelFactory):
    """An instance of a deployment: `pending` with no host by default. `InstanceFactory(ready=True, port=...)` is
    a ready instance on a host of its own (127.0.0.1), as the gateway's stand-in engine tests need."""

    class Meta:
        model = Instance

    deployment = factory.SubFactory(DeploymentFactory)
    host = None

    class Params:
        ready = factory.Trait(state=Instance.State.READY, host=factory.SubFactory(HostFactory))


def token_for(user: User) -> str:
    """A fresh API token secret for `user`."""
    return api_token_create(user=user, name="test")[1]
