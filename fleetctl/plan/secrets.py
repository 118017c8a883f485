"""Resolving secret references at plan time; values stay in memory only.

This is where a secret's value enters fleetctl, so this is where it is handed to
the redaction step every output goes through (`fleetctl.redact`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fleetctl.errors import FleetError
from fleetctl.redact import REDACTOR
from fleetctl.spec import SecretRef


class SecretError(FleetError):
    """A secret's source is missing; the message names it, never a value."""


def resolve(refs: Mapping[str, SecretRef], spec_dir: Path) -> dict[str, str]:
    """The values of `refs`; optional ones whose source is missing are left out."""
    values: dict[str, str] = {}
    for name, ref in refs.items():
        if ref.from_env is not None:
            value = os.environ.get(ref.from_env)
            where = f"environment variable {ref.from_env}"
        else:
            path = spec_dir / str(ref.from_file)
            where = f"file {path}"
            try:
                value = path.read_text(encoding="utf-8").removesuffix("\n")
            except OSError:
                value = None
        if value is None:
            if ref.optional:
                continue
            raise SecretError(
                f"secret {name}: {where} is not set (mark it optional: true "
                "if the sandbox can run without it)"
            )
        REDACTOR.add(value, ref.redacted())
        values[name] = value
    return values
