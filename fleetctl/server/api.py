"""Wire payloads of the sandbox API, exactly as Prime Intellect's SDK sends and parses them.

Requests arrive in snake_case; sandbox and list responses go out in camelCase;
gateway responses stay snake_case (see the prime-sandboxes 0.2.31 client).
Secrets have no field in any response model, so no read can return them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from fleetctl import contract
from fleetctl.contract import SandboxStatus
from fleetctl.egress import EgressError, check_lists

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env(value: dict[str, str] | None) -> dict[str, str] | None:
    """Environment names must be identifiers, values free of NUL bytes."""
    for name, item in (value or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if "\0" in item:
            raise ValueError(f"the value of {name} contains a NUL byte")
    return value


class _Request(BaseModel):
    # Unknown keys are ignored, not refused: newer SDKs send fields (gpu_type,
    # region, advanced_configs...) this server has no use for.
    model_config = ConfigDict(extra="ignore")


class StartCommand(BaseModel):
    """A main process as today's SDK sends it: an executable and its arguments."""

    model_config = ConfigDict(extra="forbid")
    executable: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _no_nul(self) -> StartCommand:
        if any("\0" in part for part in (self.executable, *self.args)):
            raise ValueError("the start command contains a NUL byte")
        return self


class CreateSandbox(_Request):
    """A create, as any SDK release sends it: 0.2.31's string start command and
    `network_access`, today's object start command, `vm`, egress lists and checkpoints."""

    name: str = Field(min_length=1, max_length=128)
    docker_image: str | None = Field(None, min_length=1, max_length=512)
    checkpoint_id: str | None = Field(None, min_length=1, max_length=64)
    start_command: str | StartCommand | None = Field(
        None, description="The main process (a shell command, or an executable and its "
        "arguments); absent or null keeps the sandbox idle."
    )  # fmt: skip
    cpu_cores: float = Field(contract.DEFAULT_CPU_CORES, gt=0, le=contract.MAX_CPU_CORES)
    memory_gb: float = Field(contract.DEFAULT_MEMORY_GB, gt=0, le=contract.MAX_MEMORY_GB)
    disk_size_gb: float | None = Field(None, gt=0, le=contract.MAX_DISK_SIZE_GB)
    gpu_count: int = Field(0, ge=0, le=0, description="The local server has no GPUs.")
    vm: bool | None = Field(
        None, description="Accepted and echoed: every sandbox of this server is the same kind."
    )
    network_access: bool = contract.DEFAULT_NETWORK_ACCESS
    network_allowlist: list[str] | None = None
    network_denylist: list[str] | None = None
    timeout_minutes: int = Field(
        contract.DEFAULT_TIMEOUT_MINUTES, ge=1, le=contract.MAX_TIMEOUT_MINUTES
    )
    idle_timeout_minutes: int | None = Field(None, ge=1, le=contract.MAX_TIMEOUT_MINUTES)
    environment_vars: dict[str, str] | None = None
    secrets: dict[str, str] | None = None
    labels: list[str] = Field(default_factory=list, max_length=64)
    idempotency_key: str | None = Field(None, max_length=256)
    volumes: list[dict[str, object]] | None = Field(
        None, description="Not offered by this server: a create with volumes is refused (501)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CreateSandbox:
        if self.docker_image is None and self.checkpoint_id is None:
            raise ValueError("docker_image is required (unless checkpoint_id is given)")
        if self.docker_image is not None and self.checkpoint_id is not None:
            raise ValueError("give docker_image or checkpoint_id, not both")
        if (
            self.idle_timeout_minutes is not None
            and self.idle_timeout_minutes > self.timeout_minutes
        ):
            raise ValueError("idle_timeout_minutes cannot exceed timeout_minutes")
        try:
            check_lists(self.network_allowlist, self.network_denylist)
        except EgressError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("environment_vars", "secrets")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_env(value)

    @field_validator("start_command")
    @classmethod
    def _no_nul_in_command(cls, value: str | StartCommand | None) -> str | StartCommand | None:
        if isinstance(value, str) and "\0" in value:
            raise ValueError("the start command contains a NUL byte")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None  # "" means no key, not one key shared by every such create


class BulkDelete(_Request):
    sandbox_ids: list[str] | None = None
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BulkDelete:
        if (self.sandbox_ids is None) == (self.labels is None) or self.labels == []:
            raise ValueError("give exactly one of sandbox_ids or labels (labels non-empty)")
        return self


class CutStreams(_Request):
    sandbox_id: str


class StreamsCut(BaseModel):
    cut: int = Field(description="How many calls in flight lost their connection.")


class BatchStatus(_Request):
    sandbox_ids: list[str] = Field(min_length=1, max_length=contract.MAX_BATCH)


class ExposeRequest(_Request):
    port: int = Field(ge=contract.PORT_RANGE[0], le=contract.PORT_RANGE[1])
    name: str | None = Field(None, max_length=63)
    protocol: Literal["HTTP", "TCP"] = "HTTP"

    @field_validator("port")
    @classmethod
    def _not_reserved(cls, port: int) -> int:
        if port in contract.RESERVED_PORTS:
            reserved = contract.RESERVED_PORTS_TEXT
            raise ValueError(f"port {port} is reserved and cannot be exposed ({reserved})")
        return port


class _Command(_Request):
    """A shell command to run in a sandbox, in a directory, with extra environment."""

    command: str = Field(min_length=1)
    working_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value) or {}


class ExecRequest(_Command):
    timeout: int = Field(contract.DEFAULT_EXEC_TIMEOUT_S, ge=1, le=contract.MAX_EXEC_TIMEOUT_S)
    user: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$",
        description="Run as this user (name or uid, optionally :group), as `docker exec -u`.",
    )


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Sandbox(_Camel):
    id: str
    name: str
    docker_image: str
    start_command: str | StartCommand | None = Field(
        description="In the form the client reads: today's SDK (0.4 on) an object, 0.2's a "
        "string, any other client the form the sandbox was created with."
    )
    cpu_cores: float
    memory_gb: float = Field(alias="memoryGB")
    disk_size_gb: float = Field(alias="diskSizeGB")
    disk_mount_path: str = "/workspace"
    gpu_count: int = 0
    vm: bool = False
    network_access: bool
    network_allowlist: list[str] | None = None
    network_denylist: list[str] | None = None
    checkpoint_id: str | None = Field(None, description="The checkpoint it was created from.")
    status: SandboxStatus
    timeout_minutes: int
    idle_timeout_minutes: int | None = None
    termination_reason: str | None = None
    environment_vars: dict[str, str] | None = None
    labels: list[str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    terminated_at: datetime | None = None
    exit_code: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    image_source: str | None = Field(
        None, description="Where the root filesystem came from (an image rootfs, or the host's)."
    )


class SandboxList(_Camel):
    sandboxes: list[Sandbox]
    total: int
    page: int
    per_page: int
    has_next: bool


class ErrorContext(_Camel):
    status: SandboxStatus
    error_type: str | None
    error_message: str | None


class SandboxStatusItem(BaseModel):
    sandbox_id: str
    status: SandboxStatus
    error_type: str | None = None
    error_message: str | None = None
    pending_image_build_id: str | None = None


class BatchError(BaseModel):
    sandbox_id: str
    code: Literal["NOT_FOUND"]
    message: str


class BatchStatusResponse(BaseModel):
    """`POST /sandbox/status:batchGet`: every id asked for is in one of the two lists."""

    statuses: list[SandboxStatusItem]
    errors: list[BatchError]


#: A background job's id: a file name part inside the sandbox (`contract.job_files`).
JOB_ID = r"^[A-Za-z0-9_-]{1,64}$"


class JobRef(_Request):
    sandbox_id: str = Field(min_length=1)
    job_id: str = Field(pattern=JOB_ID)


class BatchJobStatus(_Request):
    jobs: list[JobRef] = Field(min_length=1, max_length=contract.MAX_BATCH)


class JobStatusItem(BaseModel):
    sandbox_id: str
    job_id: str
    completed: bool
    exit_code: int | None = None


class JobError(BaseModel):
    sandbox_id: str
    job_id: str
    code: Literal["NOT_FOUND", "NOT_RUNNING", "RUNTIME_ERROR"]
    message: str


class BatchJobStatusResponse(BaseModel):
    """`POST /sandbox/background-jobs/status:batchGet`: each job's exit file read."""

    statuses: list[JobStatusItem]
    errors: list[JobError]


class StartJob(_Command):
    """`POST /sandbox/{id}/background-jobs`: run `command` detached, once for this id."""

    job_id: str = Field(pattern=JOB_ID)


class JobStarted(BaseModel):
    """`started` false: a job of this id was started before, and was not again."""

    sandbox_id: str
    job_id: str
    started: bool


class JobList(BaseModel):
    """`GET /sandbox/{id}/background-jobs`: the jobs the server started there."""

    jobs: list[JobStatusItem]


class BulkDeleteResponse(BaseModel):
    succeeded: list[str]
    failed: list[dict[str, str]]
    message: str


class GatewayAuth(BaseModel):
    token: str
    gateway_url: str
    user_ns: str
    job_id: str
    expires_at: str
    is_vm: bool = False


class ExecResponse(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    #: Past 16 MiB, a stream's output is dropped: said here (today's clients ignore it).
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class UploadResponse(BaseModel):
    success: bool
    path: str
    size: int
    timestamp: datetime


class ReadFileResponse(BaseModel):
    content: str
    size: int
    total_size: int
    offset: int
    truncated: bool


class ExposedPort(BaseModel):
    exposure_id: str
    sandbox_id: str
    port: int
    name: str | None
    url: str
    tls_socket: str
    protocol: str
    external_port: int | None = None
    external_endpoint: str | None = None
    created_at: str


class ExposedPortList(BaseModel):
    exposures: list[ExposedPort]


class Logs(BaseModel):
    logs: str


class EgressLists(BaseModel):
    """A sandbox's egress policy: at most one list; an empty allowlist denies everything,
    an empty denylist allows everything (what ["*"] means to today's SDK)."""

    allowlist: list[str] | None = None
    denylist: list[str] | None = None

    @model_validator(mode="after")
    def _lists(self) -> EgressLists:
        try:
            check_lists(self.allowlist, self.denylist)
        except EgressError as exc:
            raise ValueError(str(exc)) from None
        return self


class EgressPolicyStatus(BaseModel):
    """Desired and applied egress policy (applied at once here)."""

    policy: EgressLists
    generation: int
    applied_generation: int
    applied: bool


class Checkpoint(BaseModel):
    """A checkpoint as today's SDK reads it (snake_case only). States: PENDING, then
    DURABLE (it can be restored) or FAILED (`error` says why)."""

    id: str
    sandbox_id: str
    state: Literal["PENDING", "DURABLE", "FAILED"]
    depth: int
    docker_image: str
    created_at: datetime
    updated_at: datetime
    parent_id: str | None = None
    team_id: str | None = None
    disk_size_bytes: int | None = None
    stored_bytes: int | None = None
    occupied_bytes: int = 0
    error: str | None = None


class CheckpointList(BaseModel):
    checkpoints: list[Checkpoint]


class CheckpointIds(_Request):
    checkpoint_ids: list[str] = Field(min_length=1, max_length=contract.MAX_BATCH)


class CheckpointError(BaseModel):
    checkpoint_id: str
    code: Literal["NOT_FOUND", "CONFLICT"]
    message: str


class CheckpointBatch(BaseModel):
    checkpoints: list[Checkpoint]
    errors: list[CheckpointError]


class CheckpointsDeleted(BaseModel):
    deleted: list[str]
    errors: list[CheckpointError]
