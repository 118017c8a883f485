"""Request and response models of the sandbox API (snake_case in Python, camelCase on the wire)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from fleetctl import contract
from fleetctl.contract import SandboxStatus

__all__ = ["SandboxStatus"]  # re-exported: the SDK's users import it from here


class StartCommand(BaseModel):
    """A main process as an executable and its arguments (today's API form)."""

    executable: str
    args: list[str] = Field(default_factory=list)


class CreateSandboxRequest(BaseModel):
    """What to create. `secrets` are injected as environment variables and never read back.
    Without a `start_command` the sandbox stays idle, ready for `execute_command`."""

    name: str
    docker_image: str
    start_command: str | StartCommand | None = None
    cpu_cores: float = contract.DEFAULT_CPU_CORES
    memory_gb: float = contract.DEFAULT_MEMORY_GB
    disk_size_gb: float = contract.DEFAULT_DISK_SIZE_GB
    network_access: bool = contract.DEFAULT_NETWORK_ACCESS
    timeout_minutes: int = contract.DEFAULT_TIMEOUT_MINUTES
    environment_vars: dict[str, str] | None = None
    secrets: dict[str, str] | None = Field(default=None, repr=False)
    labels: list[str] = Field(default_factory=list)
    idempotency_key: str | None = None
    team_id: str | None = None


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
    status: str
    timeout_minutes: int
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


class BatchStatusItem(BaseModel):
    sandbox_id: str
    status: str
    error_type: str | None = None
    error_message: str | None = None


class BatchStatusError(BaseModel):
    sandbox_id: str
    code: str
    message: str = ""


class BatchStatus(BaseModel):
    """`POST /sandbox/status:batchGet`: every id asked for is in one of the two lists."""

    statuses: list[BatchStatusItem]
    errors: list[BatchStatusError] = Field(default_factory=list)


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
