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
    BulkDeleteSandboxResponse,
    CommandResponse,
    CreateSandboxRequest,
    ExposedPort,
    FileUploadResponse,
    ListExposedPortsResponse,
    Sandbox,
    SandboxListResponse,
    SandboxStatus,
    StartCommand,
)

__all__ = [
    "APIClient",
    "APIError",
    "APITimeoutError",
    "AsyncAPIClient",
    "AsyncSandboxClient",
    "BackgroundJob",
    "BackgroundJobStatus",
    "BulkDeleteSandboxResponse",
    "CommandResponse",
    "CommandTimeoutError",
    "CreateSandboxRequest",
    "DownloadTimeoutError",
    "ExposedPort",
    "FileUploadResponse",
    "ListExposedPortsResponse",
    "PaymentRequiredError",
    "RetryPolicy",
    "Sandbox",
    "SandboxClient",
    "SandboxFileNotFoundError",
    "SandboxImagePullError",
    "SandboxListResponse",
    "SandboxNotRunningError",
    "SandboxOOMError",
    "SandboxStatus",
    "SandboxTimeoutError",
    "StartCommand",
    "UnauthorizedError",
    "UploadTimeoutError",
]
