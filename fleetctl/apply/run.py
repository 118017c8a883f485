"""One `plan` / `apply` / `destroy` run: specs → secrets and digests → live → plan → execute."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetctl.apply import live
from fleetctl.apply.executor import Emit, Options, Result, execute
from fleetctl.apply.secrets import resolve
from fleetctl.plan.identity import digest
from fleetctl.plan.model import Plan
from fleetctl.plan.planner import Limits, plan
from fleetctl.sandboxes import AsyncSandboxClient
from fleetctl.spec.expand import DesiredSandbox, Fleet

DIGEST_KEY_ENV = "FLEETCTL_DIGEST_KEY"


@dataclass(frozen=True, slots=True)
class Prepared:
    """Desired sandboxes with their digests and resolved secrets (values in memory only)."""

    desired: tuple[DesiredSandbox, ...]
    digests: dict[tuple[str, str], str]
    secrets: dict[tuple[str, str], dict[str, str]]
    fleets: tuple[str, ...]


def prepare(fleets: Sequence[Fleet], api_key: str) -> Prepared:
    """Resolve every secret and digest every desired sandbox.

    Secrets enter digests through an HMAC keyed by FLEETCTL_DIGEST_KEY, else by
    the API key: whoever reads labels cannot recover a secret from them.
    """
    secret_key = hashlib.sha256((os.environ.get(DIGEST_KEY_ENV) or api_key).encode()).digest()
    desired: list[DesiredSandbox] = []
    digests: dict[tuple[str, str], str] = {}
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    for fleet in fleets:
        spec_dir = Path(fleet.source).parent
        for sandbox in fleet.sandboxes:
            ident = (sandbox.fleet, sandbox.key)
            secrets[ident] = resolve(sandbox.secrets, spec_dir)
            digests[ident] = digest(sandbox, secrets[ident], secret_key)
            desired.append(sandbox)
    return Prepared(tuple(desired), digests, secrets, tuple(f.name for f in fleets))


async def make_plan(client: AsyncSandboxClient, prepared: Prepared, limits: Limits) -> Plan:
    owned = await live.owned(client, prepared.fleets)
    return plan(prepared.desired, prepared.digests, owned, prepared.fleets, limits)


async def apply_plan(
    client: AsyncSandboxClient, prepared: Prepared, the_plan: Plan, options: Options, emit: Emit
) -> Result:
    return await execute(the_plan, client, prepared.digests, prepared.secrets, options, emit)
