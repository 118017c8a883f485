"""Request and response models of the sandbox API (snake_case in Python, camelCase on the wire)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from fleetctl import contract
from fleetctl.contract import SandboxStatus
from fleetctl.egress import EgressError, check_lists

__all__ = ["SandboxStatus"]  # re-exported: the SDK's users import it from here


class StartCommand(BaseModel):
    """A main process as an executable and its arguments (today's API form)."""

    executable: str
    args: list[str] = Field(default_factory=list)


class CreateSandboxRequest(BaseModel):
    """What to create. `secrets` are injected as environment variables and never read back.
    Without a `start_command` the sandbox stays idle, ready for `execute_command`.

    Today's API adds: `checkpoint_id` (start from a checkpoint's files, instead of a
    `docker_image`), `idle_timeout_minutes` (stop after that long without a call), and
    `network_allowlist` / `network_denylist` (at most one; see `fleetctl.egress`)."""

    name: str
    docker_image: str | None = None
    checkpoint_id: str | None = None
    start_command: str | StartCommand | None = None
    cpu_cores: float = contract.DEFAULT_CPU_CORES
    memory_gb: float = contract.DEFAULT_MEMORY_GB
    disk_size_gb: float = contract.DEFAULT_DISK_SIZE_GB
    network_access: bool = contract.DEFAULT_NETWORK_ACCESS
    network_allowlist: list[str] | None = None
    network_denylist: list[str] | None = None
    timeout_minutes: int = contract.DEFAULT_TIMEOUT_MINUTES
    idle_timeout_minutes: int | None = Field(default=None, ge=1)
    environment_vars: dict[str, str] | None = None
    secrets: dict[str, str] | None = Field(default=None, repr=False)
    labels: list[str] = Field(default_factory=list)
    idempotency_key: str | None = None
    team_id: str | None = None
    vm: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CreateSandboxRequest:
        if (self.docker_image is None) == (self.checkpoint_id is None):
            raise ValueError("give exactly one of docker_image or checkpoint_id")
        if self.idle_timeout_minutes is not None and self.idle_timeout_minutes > max(
            self.timeout_minutes, 1
        ):
            raise ValueError("idle_timeout_minutes cannot exceed timeout_minutes")
        try:
            check_lists(self.network_allowlist, self.network_denylist)
        except EgressError as exc:
            raise ValueError(str(exc)) from None
        return self


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Sandbox(_Wire):
    id: str
    name: str
    docker_image: str
    start_command: str | StartCommand | None = None
    cpu_cores: float
    memory_gb: float = Field(alias="memoryGB")
    disk_size_gb: float = Field(alias="diskSizeGB")
    network_access: bool = True
    network_allowlist: list[str] | None = None
    network_denylist: list[str] | None = None
    vm: bool = False
    status: str
    timeout_minutes: int
    idle_timeout_minutes: int | None = None
    environment_vars: dict[str, Any] | None = None
    labels: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    terminated_at: datetime | None = None
    exit_code: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    termination_reason: str | None = None
    #: The local server's: where the root filesystem came from, an image's with its digest.
    image_source: str | None = None


class SandboxListResponse(_Wire):
    sandboxes: list[Sandbox]
    total: int
    page: int
    per_page: int
    has_next: bool


class CommandResponse(BaseModel):
    stdout: str
    stderr: str
    exit_code: int


class FileUploadResponse(BaseModel):
    success: bool
    path: str
    size: int
    timestamp: datetime | None = None


class BulkDeleteSandboxResponse(BaseModel):
    succeeded: list[str]
    failed: list[dict[str, str]]
    message: str = ""


class ExposedPort(BaseModel):
    exposure_id: str
    sandbox_id: str
    port: int
    name: str | None = None
    url: str
    tls_socket: str | None = None
    protocol: str | None = None
    external_port: int | None = None
    external_endpoint: str | None = None
    created_at: str | None = None


class ListExposedPortsResponse(BaseModel):
    exposures: list[ExposedPort]


class Logs(BaseModel):
    logs: str


class SandboxStatusSnapshot(BaseModel):
    sandbox_id: str
    status: str
    error_type: str | None = None
    error_message: str | None = None


class SandboxStatusLookupError(BaseModel):
    sandbox_id: str
    code: str
    message: str = ""


class BatchSandboxStatusResponse(BaseModel):
    """`get_sandbox_statuses`: every id asked for is in `statuses` or in `errors`."""

    statuses: list[SandboxStatusSnapshot]
    errors: list[SandboxStatusLookupError] = Field(default_factory=list)


class GatewayAuth(BaseModel):
    """A sandbox's data-plane address and token (snake_case on the wire)."""

    token: str
    gateway_url: str
    user_ns: str
    job_id: str
    expires_at: datetime


class ReadFileResponse(BaseModel):
    content: str
    size: int
    total_size: int | None = None
    offset: int | None = None
    truncated: bool = False


class BackgroundJob(BaseModel):
    """A detached command; its output and exit code live in files inside the sandbox."""

    job_id: str
    sandbox_id: str
    stdout_log_file: str
    stderr_log_file: str
    exit_file: str

    @classmethod
    def for_id(cls, job_id: str, sandbox_id: str) -> BackgroundJob:
        """The handle of the job `job_id`: its files inside the sandbox."""
        files = contract.job_files(job_id)
        return cls(job_id=job_id, sandbox_id=sandbox_id, stdout_log_file=files.stdout,
                   stderr_log_file=files.stderr, exit_file=files.exit)  # fmt: skip


class BackgroundJobStatus(BaseModel):
    job_id: str
    completed: bool
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class BackgroundJobStatusSnapshot(BaseModel):
    """A job's completion without its output (`get_background_job_statuses`)."""

    sandbox_id: str
    job_id: str
    completed: bool
    exit_code: int | None = None


class BackgroundJobStatusLookupError(BaseModel):
    sandbox_id: str
    job_id: str
    code: str
    message: str = ""


class BatchBackgroundJobStatusResponse(BaseModel):
    statuses: list[BackgroundJobStatusSnapshot]
    errors: list[BackgroundJobStatusLookupError] = Field(default_factory=list)


class SandboxCheckpoint(BaseModel):
    """A sandbox's files frozen: its writable layer and workspace. Only a DURABLE one can
    be restored (`CreateSandboxRequest(checkpoint_id=...)`); FAILED says why in `error`."""

    id: str
    sandbox_id: str
    state: str
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


class CheckpointLookupError(BaseModel):
    checkpoint_id: str
    code: str
    message: str = ""


class BatchCheckpointResponse(BaseModel):
    checkpoints: list[SandboxCheckpoint]
    errors: list[CheckpointLookupError] = Field(default_factory=list)


class DeleteSandboxCheckpointsResponse(BaseModel):
    """Each checkpoint of the sandbox deleted, or the reason it was kept (CONFLICT:
    still pending, or under a running sandbox)."""

    deleted: list[str]
    errors: list[CheckpointLookupError] = Field(default_factory=list)


class CheckpointList(BaseModel):
    checkpoints: list[SandboxCheckpoint]
