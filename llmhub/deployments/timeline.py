"""The deployment timeline: the events a deployment's page lists (created, scheduled, pulling, ready...).

Imports only models, so the fleet (which places and runs the instances) records events without reaching up
into deployments' services.
"""

from .models import Deployment, DeploymentEvent


def event_record(*, deployment: Deployment, kind: str, message: str) -> DeploymentEvent:
    """Append one event (e.g. kind "ready", message "instance 7 ready on host gpu-1") to the timeline."""
    return DeploymentEvent.objects.create(deployment=deployment, kind=kind, message=message)
