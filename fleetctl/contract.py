"""The sandbox API's shared facts, defined once: statuses, error types, defaults, limits,
and where a background job keeps its files inside a sandbox.

The SDK, the local server, the spec language and the orchestrator all read these;
none of them writes its own copy. This module imports nothing from fleetctl.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SandboxStatus(StrEnum):
    """PENDING → PROVISIONING → RUNNING → TERMINATED | ERROR | TIMEOUT."""

    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"


#: Statuses a sandbox never leaves.
FINAL_STATUSES = frozenset({SandboxStatus.TERMINATED, SandboxStatus.ERROR, SandboxStatus.TIMEOUT})


class ErrorType(StrEnum):
    """`errorType` of a sandbox that ended badly; the first three drive the SDK's typed errors."""

    OOM_KILLED = "OOM_KILLED"
    TIMEOUT = "TIMEOUT"
    IMAGE_PULL_FAILED = "IMAGE_PULL_FAILED"
    SANDBOX_NOT_FOUND = "SANDBOX_NOT_FOUND"
    START_FAILED = "START_FAILED"
    DISK_LIMIT_EXCEEDED = "DISK_LIMIT_EXCEEDED"


# -- what a create gets when it does not say ------------------------------------------
# A create without a start command keeps the sandbox idle for exec calls (what the
# guide's `tail -f /dev/null` is for): the server runs nothing of the caller's.

DEFAULT_CPU_CORES = 1.0
DEFAULT_MEMORY_GB = 2.0
DEFAULT_DISK_SIZE_GB = 5
DEFAULT_TIMEOUT_MINUTES = 60
DEFAULT_NETWORK_ACCESS = True

# -- limits ---------------------------------------------------------------------------

MAX_CPU_CORES = 64
MAX_MEMORY_GB = 512
MAX_DISK_SIZE_GB = 1000
MAX_TIMEOUT_MINUTES = 1440
DEFAULT_EXEC_TIMEOUT_S = 300
MAX_EXEC_TIMEOUT_S = 900
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
#: Ids per batch status call.
MAX_BATCH = 100
#: Exposable ports: this range, except the platform's own.
PORT_RANGE = (22, 9000)
RESERVED_PORTS = frozenset({2222, 8080, 8081})
_ports = sorted(RESERVED_PORTS)
#: "2222, 8080 and 8081", for messages.
RESERVED_PORTS_TEXT = ", ".join(map(str, _ports[:-1])) + f" and {_ports[-1]}"

# -- background jobs inside a sandbox ---------------------------------------------------

#: Where a background job's files live inside its sandbox.
JOB_DIR = "/tmp"


@dataclass(frozen=True, slots=True)
class JobFiles:
    """The files of the background job `job_id`: its output, and its exit code once done."""

    stdout: str
    stderr: str
    exit: str


def job_files(job_id: str) -> JobFiles:
    """Where the job `job_id` writes; `job_files("x-*")` gives the glob of a family of jobs."""
    stem = f"{JOB_DIR}/job_{job_id}"
    return JobFiles(f"{stem}.stdout.log", f"{stem}.stderr.log", f"{stem}.exit")
