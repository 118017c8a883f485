"""fleetctl.sandboxes: the sandbox SDK, sync and async, over httpx.

Method for method the SDK of the sandbox SDK guide: code written against
`prime_sandboxes` runs against fleetctl's local server, or Prime Intellect's
cloud, by changing only its import.

    from fleetctl.sandboxes import SandboxClient, APIClient, CreateSandboxRequest

    client = SandboxClient(APIClient())
    sandbox = client.create(CreateSandboxRequest(name="demo", docker_image="python:3.11-slim"))
    client.wait_for_creation(sandbox.id)
    print(client.execute_command(sandbox.id, "echo hi").stdout)
"""

from fleetctl.sandboxes._retry import RetryPolicy
from fleetctl.sandboxes.client import APIClient, AsyncAPIClient, AsyncSandboxClient, SandboxClient
from fleetctl.sandboxes.errors import (
    APIError,
    APITimeoutError,
    CommandTimeoutError,
    ConnectFailure,
    DownloadTimeoutError,
    PaymentRequiredError,
    SandboxFileNotFoundError,
    SandboxImagePullError,
    SandboxNotRunningError,
    SandboxOOMError,
    SandboxTimeoutError,
    UnauthorizedError,
    UploadTimeoutError,
)
from fleetctl.sandboxes.models import (
    BackgroundJob,
    BackgroundJobStatus,
    BackgroundJobStatusSnapshot,
    BatchCheckpointResponse,
    BatchSandboxStatusResponse,
    BulkDeleteSandboxResponse,
    CheckpointLookupError,
    CommandResponse,
    CreateSandboxRequest,
    DeleteSandboxCheckpointsResponse,
    ExposedPort,
    FileUploadResponse,
    ListExposedPortsResponse,
    Sandbox,
    SandboxCheckpoint,
    SandboxListResponse,
    SandboxStatus,
    SandboxStatusLookupError,
    SandboxStatusSnapshot,
    StartCommand,
)
from fleetctl.sandboxes.process import AsyncSandboxProcess, SandboxProcess

__all__ = [
    "APIClient",
    "APIError",
    "APITimeoutError",
    "AsyncAPIClient",
    "AsyncSandboxClient",
    "AsyncSandboxProcess",
    "BackgroundJob",
    "BackgroundJobStatus",
    "BackgroundJobStatusSnapshot",
    "BatchCheckpointResponse",
    "BatchSandboxStatusResponse",
    "BulkDeleteSandboxResponse",
    "CheckpointLookupError",
    "CommandResponse",
    "CommandTimeoutError",
    "ConnectFailure",
    "CreateSandboxRequest",
    "DeleteSandboxCheckpointsResponse",
    "DownloadTimeoutError",
    "ExposedPort",
    "FileUploadResponse",
    "ListExposedPortsResponse",
    "PaymentRequiredError",
    "RetryPolicy",
    "Sandbox",
    "SandboxCheckpoint",
    "SandboxClient",
    "SandboxFileNotFoundError",
    "SandboxImagePullError",
    "SandboxListResponse",
    "SandboxNotRunningError",
    "SandboxOOMError",
    "SandboxProcess",
    "SandboxStatus",
    "SandboxStatusLookupError",
    "SandboxStatusSnapshot",
    "SandboxTimeoutError",
    "StartCommand",
    "UnauthorizedError",
    "UploadTimeoutError",
]
