"""What the service's pieces share: settings, the store, the runtime, the environments held
in memory, and the errors routes turn into statuses."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fleetctl.server.images.pull import Puller
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


class Failed(Exception):
    """A command the sandbox's runtime took and lost (its exec helper died under it): a
    500 that says so, never retried by clients (the command may have run)."""


class Busy(Exception):
    """In use: a checkpoint (pending, restored by a live sandbox, or a parent), an image
    (run by live sandboxes), a store being written."""


class Unsupported(Exception):
    """A feature of the sandbox API this server does not offer (volumes, LAN networks...)."""


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
    images: Puller | None = None
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    #: When each sandbox was last used through the data plane (for idle timeouts).
    used: dict[str, datetime] = field(default_factory=dict)
    #: Commands running in each sandbox: a sandbox running one is not idle.
    busy: dict[str, int] = field(default_factory=dict)

    @property
    def clock(self) -> Clock:
        return self.settings.clock


def shell_command(start_command: object) -> str | None:
    """A stored start command (a shell string, or today's {executable, args}) as one
    shell command; None keeps the sandbox idle."""
    if isinstance(start_command, dict):
        return "exec " + shlex.join([start_command["executable"], *start_command["args"]])
    return start_command if isinstance(start_command, str) else None


def handle_of(record: SandboxRecord | None) -> Handle | None:
    """The runtime's handle of a sandbox, once it was started."""
    return record.runtime if record and record.runtime else None
