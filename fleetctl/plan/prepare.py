"""The desired side of a plan: every secret resolved, every desired sandbox digested.

Secrets enter digests through an HMAC keyed by FLEETCTL_DIGEST_KEY, else by the API
key: whoever reads labels cannot recover a secret from them. Values stay in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetctl.plan.identity import digest, setup_digest
from fleetctl.plan.secrets import resolve
from fleetctl.spec.expand import DesiredSandbox, Fleet

DIGEST_KEY_ENV = "FLEETCTL_DIGEST_KEY"


@dataclass(frozen=True, slots=True)
class Prepared:
    """Desired sandboxes with their digests and resolved secrets (values in memory only)."""

    desired: tuple[DesiredSandbox, ...]
    digests: dict[tuple[str, str], str]
    #: Of sandboxes whose group has a `prepare:` step: its setup digest.
    setups: dict[tuple[str, str], str]
    secrets: dict[tuple[str, str], dict[str, str]]
    fleets: tuple[str, ...]
    file_digests: dict[str, str]


def prepare(fleets: Sequence[Fleet], api_key: str) -> Prepared:
    """Resolve every secret and digest every desired sandbox (and every file source)."""
    secret_key = hashlib.sha256((os.environ.get(DIGEST_KEY_ENV) or api_key).encode()).digest()
    desired: list[DesiredSandbox] = []
    digests: dict[tuple[str, str], str] = {}
    setups: dict[tuple[str, str], str] = {}
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    for fleet in fleets:
        spec_dir = Path(fleet.source).parent
        for sandbox in fleet.sandboxes:
            ident = (sandbox.fleet, sandbox.key)
            secrets[ident] = resolve(sandbox.secrets, spec_dir)
            digests[ident] = digest(sandbox, secrets[ident], secret_key)
            if sandbox.prepare is not None:
                setups[ident] = setup_digest(sandbox, secrets[ident], secret_key)
            desired.append(sandbox)
    sources = {f.source for s in desired for f in s.files}
    file_digests = {source: content_digest(Path(source)) for source in sources}
    return Prepared(tuple(desired), digests, setups, secrets, tuple(f.name for f in fleets),
                    file_digests)  # fmt: skip


def content_digest(source: Path) -> str:
    """A digest of a file, or of every file under a directory with its relative path."""
    hasher = hashlib.sha256()
    paths = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for path in paths:
        hasher.update(str(path.relative_to(source) if source.is_dir() else "").encode() + b"\0")
        hasher.update(path.read_bytes())
    return hasher.hexdigest()[:16]
