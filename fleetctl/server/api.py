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


class CreateSandbox(_Request):
    name: str = Field(min_length=1, max_length=128)
    docker_image: str = Field(min_length=1, max_length=512)
    start_command: str | None = Field(
        contract.IDLE_START_COMMAND, description="The main process; null keeps the sandbox idle."
    )
    cpu_cores: float = Field(contract.DEFAULT_CPU_CORES, gt=0, le=contract.MAX_CPU_CORES)
    memory_gb: float = Field(contract.DEFAULT_MEMORY_GB, gt=0, le=contract.MAX_MEMORY_GB)
    disk_size_gb: float = Field(contract.DEFAULT_DISK_SIZE_GB, gt=0, le=contract.MAX_DISK_SIZE_GB)
    gpu_count: int = Field(0, ge=0, le=0, description="The local server has no GPUs.")
    vm: bool = False
    network_access: bool = contract.DEFAULT_NETWORK_ACCESS
    timeout_minutes: int = Field(
        contract.DEFAULT_TIMEOUT_MINUTES, ge=1, le=contract.MAX_TIMEOUT_MINUTES
    )
    environment_vars: dict[str, str] | None = None
    secrets: dict[str, str] | None = None
    labels: list[str] = Field(default_factory=list, max_length=64)
    idempotency_key: str | None = Field(None, max_length=256)

    @field_validator("vm")
    @classmethod
    def _no_vm(cls, value: bool) -> bool:
        if value:
            raise ValueError("VM sandboxes are not supported by the local server")
        return value

    @field_validator("environment_vars", "secrets")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_env(value)

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


class ExecRequest(_Request):
    command: str = Field(min_length=1)
    working_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value) or {}

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
    start_command: str | None
    cpu_cores: float
    memory_gb: float = Field(alias="memoryGB")
    disk_size_gb: float = Field(alias="diskSizeGB")
    disk_mount_path: str = "/workspace"
    gpu_count: int = 0
    vm: bool = False
    network_access: bool
    status: SandboxStatus
    timeout_minutes: int
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


class BatchStatusItem(_Camel):
    id: str
    status: SandboxStatus | None = None
    error_type: str | None = None
    error_message: str | None = None
    error: str | None = None


class BatchStatusResponse(_Camel):
    sandboxes: list[BatchStatusItem]


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
