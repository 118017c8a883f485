"""The create request of a desired sandbox: its image (or checkpoint), size, network,
environment and secrets, as both a fleet's sandboxes and a group's setup sandbox ask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleetctl.sandboxes import CreateSandboxRequest
from fleetctl.spec.expand import DesiredSandbox


def sandbox_request(
    desired: DesiredSandbox,
    secrets: Mapping[str, str],
    *,
    checkpoint: str | None,
    **fields: Any,
) -> CreateSandboxRequest:
    """`desired`'s request, started from `checkpoint` when given (else its image), with
    the other `fields` (name, labels, timeout_minutes...) as the caller says."""
    return CreateSandboxRequest(
        docker_image=None if checkpoint else desired.image,
        checkpoint_id=checkpoint,
        cpu_cores=desired.cpu_cores,
        memory_gb=desired.memory_gb,
        disk_size_gb=desired.disk_size_gb,
        network_access=desired.network_access,
        network_allowlist=desired.egress.allow if desired.egress else None,
        network_denylist=desired.egress.deny if desired.egress else None,
        environment_vars=dict(desired.env),
        secrets=dict(secrets) or None,
        **fields,
    )
