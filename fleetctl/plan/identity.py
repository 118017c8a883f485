"""How fleetctl recognises its own sandboxes: labels are the state.

Every managed sandbox carries the user's labels plus three of fleetctl's:
`fleetctl.fleet=<fleet>`, `fleetctl.key=<key>` and `fleetctl.digest=<digest>`,
the digest covering every field that cannot change in place. Secrets enter the
digest only through an HMAC keyed by a value the labels' readers cannot see,
so a rotation is detected while the value stays unguessable from the label.

Inside a sandbox, fleetctl finds its own things by name: a spec job's background
job id (`job_id`), and the marker file listing the uploaded files' digests
(`FILES_MARKER`). The executor writes them; refresh and status read them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

from fleetctl.spec.expand import REPLICA_ENV, DesiredSandbox

PREFIX = "fleetctl."
FLEET_LABEL = PREFIX + "fleet="
KEY_LABEL = PREFIX + "key="
DIGEST_LABEL = PREFIX + "digest="
#: On sandboxes started from a `prepare:` step: its setup digest, and the checkpoint.
SETUP_LABEL = PREFIX + "setup="
CHECKPOINT_LABEL = PREFIX + "checkpoint="
#: Background job ids of spec jobs: this prefix, then the job's name.
JOB_PREFIX = "fleetctl-"
#: Inside each sandbox: "<content digest> <target>" per uploaded file of the spec.
FILES_MARKER = "/tmp/.fleetctl-files"


def job_id(name: str) -> str:
    """The background job id of the spec job `name`: fixed, so that `status`, `wait` and
    later applies find the job again."""
    return JOB_PREFIX + name


def fleet_label(fleet: str) -> str:
    return FLEET_LABEL + fleet


def _keyed(secrets: Mapping[str, str], secret_key: bytes) -> dict[str, str]:
    return {
        name: hmac.new(secret_key, value.encode(), hashlib.sha256).hexdigest()
        for name, value in sorted(secrets.items())
    }


def _short(material: object) -> str:
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def setup_digest(sandbox: DesiredSandbox, secrets: Mapping[str, str], secret_key: bytes) -> str:
    """A short digest of what a group's `prepare:` makes (the same for every replica):
    its checkpoint is reused while this stays the same."""
    assert sandbox.prepare is not None
    return _short({
        "image": sandbox.image, "from_checkpoint": sandbox.from_checkpoint,
        "prepare": sandbox.prepare.model_dump(), "cpu_cores": sandbox.cpu_cores,
        "memory_gb": sandbox.memory_gb, "disk_size_gb": sandbox.disk_size_gb,
        "network_access": sandbox.network_access,
        "env": {k: v for k, v in sorted(sandbox.env.items()) if k != REPLICA_ENV},
        "secrets": _keyed(secrets, secret_key),
    })  # fmt: skip


def digest(sandbox: DesiredSandbox, secrets: Mapping[str, str], secret_key: bytes) -> str:
    """A short digest of the fields that need a new sandbox when they change."""
    immutable = {
        "image": sandbox.image,
        "from_checkpoint": sandbox.from_checkpoint,
        "prepare": sandbox.prepare.model_dump() if sandbox.prepare else None,
        "idle_timeout_minutes": sandbox.idle_timeout_minutes,
        "start_command": sandbox.start_command,
        "cpu_cores": sandbox.cpu_cores,
        "memory_gb": sandbox.memory_gb,
        "disk_size_gb": sandbox.disk_size_gb,
        "timeout_minutes": sandbox.timeout_minutes,
        "network_access": sandbox.network_access,
        "env": dict(sorted(sandbox.env.items())),
        "secrets": _keyed(secrets, secret_key),
        "labels": list(sandbox.labels),
    }
    if sandbox.egress is not None:  # only when given: older sandboxes' digests stand
        immutable["egress"] = sandbox.egress.model_dump()
    return _short(immutable)


def labels(sandbox: DesiredSandbox, sandbox_digest: str) -> list[str]:
    """The labels a created sandbox carries: the user's, then fleetctl's own."""
    own = [fleet_label(sandbox.fleet), KEY_LABEL + sandbox.key, DIGEST_LABEL + sandbox_digest]
    return [*sandbox.labels, *own]


def parse(sandbox_labels: Sequence[str]) -> tuple[str, str, str] | None:
    """(fleet, key, digest) from a sandbox's labels, or None if fleetctl does not own it."""
    found = {}
    for label in sandbox_labels:
        for name, prefix in (("fleet", FLEET_LABEL), ("key", KEY_LABEL), ("digest", DIGEST_LABEL)):
            if label.startswith(prefix):
                found[name] = label[len(prefix) :]
    if len(found) != 3:
        return None
    return found["fleet"], found["key"], found["digest"]


def idempotency_key(fleet: str, key: str, sandbox_digest: str, replacing: str | None) -> str:
    """The same for every apply that would make the same sandbox: a killed and re-run
    apply, or two at once, get the one sandbox back. `replacing` (the id of a dead or
    outdated sandbox) makes a recreate a new sandbox, not the dead one again."""
    material = f"{fleet}\0{key}\0{sandbox_digest}\0{replacing or '-'}"
    return "fleetctl-" + hashlib.sha256(material.encode()).hexdigest()[:40]
