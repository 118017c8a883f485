"""What the service's pieces share: settings, the store, the runtime, the environments held
in memory, and the errors routes turn into statuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fleetctl.server.options import ImagePolicy
from fleetctl.server.runtime.base import Handle, Runtime
from fleetctl.server.store import SandboxRecord, Store, utcnow

Clock = Callable[[], datetime]


class NotFound(Exception):
    """No sandbox (or exposure, or file) with this id or path."""


class NotRunning(Exception):
    """The sandbox exists but is not RUNNING; carries its record for the error context."""

    def __init__(self, record: SandboxRecord) -> None:
        super().__init__(f"sandbox {record.id} is not running (status {record.status})")
        self.record = record


class Refused(Exception):
    """A request this host cannot honour, or that conflicts with current state."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    image_policy: ImagePolicy = "host"
    clock: Clock = utcnow
    #: Multiplies every sandbox lifetime; tests use e.g. 0.01 (a 1-minute timeout lasts 0.6 s).
    timeout_scale: float = 1.0


@dataclass(slots=True)
class Shared:
    """State every piece of the service reads. `env` holds each sandbox's environment,
    secrets included: in memory only, never written down."""

    store: Store
    runtime: Runtime
    settings: Settings
    env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def clock(self) -> Clock:
        return self.settings.clock


def handle_of(record: SandboxRecord | None) -> Handle | None:
    """The runtime's handle of a sandbox, once it was started."""
    return record.runtime if record and record.runtime else None
