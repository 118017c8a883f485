"""Exceptions of the sandbox SDK, as the sandbox SDK guide defines them.

    Exception
    ├── APIError                      non-2xx, malformed response or network failure
    │   ├── UnauthorizedError         401, or no API key for a remote context
    │   ├── PaymentRequiredError      402
    │   ├── APITimeoutError           no response in time
    │   ├── SandboxFileNotFoundError  read of a file that does not exist
    │   └── ConnectFailure            a command-session call failed (`code`: not_found...)
    └── RuntimeError
        ├── SandboxNotRunningError    the sandbox is not RUNNING (sandbox_id, status, error_type)
        │   ├── SandboxOOMError       errorType OOM_KILLED
        │   ├── SandboxTimeoutError   errorType TIMEOUT (lifetime exceeded)
        │   └── SandboxImagePullError errorType IMAGE_PULL_FAILED
        ├── CommandTimeoutError       execute_command past its `timeout`
        ├── UploadTimeoutError
        └── DownloadTimeoutError

The tree matches `prime_sandboxes`, so code written against the guide catches
the same classes after changing only its import.
"""

from __future__ import annotations

from fleetctl.contract import ErrorType


class APIError(Exception):
    """An API call failed; `status_code` is set when the server answered."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ConnectFailure(APIError):
    """A command-session (Connect RPC) call failed: `code` as the protocol names it
    (e.g. "not_found"), `message` as the server said it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"command session call failed ({code}): {message}")
        self.code = code
        self.message = message


class UnauthorizedError(APIError):
    """The API key (or a gateway token) was refused, or none is configured."""


class PaymentRequiredError(APIError):
    """The account cannot pay for this (HTTP 402)."""


class APITimeoutError(APIError):
    """The API did not answer in time."""


class SandboxFileNotFoundError(APIError):
    """A file read from a sandbox does not exist."""


class SandboxNotRunningError(RuntimeError):
    """An operation needs a RUNNING sandbox and this one is not."""

    def __init__(
        self,
        sandbox_id: str,
        status: str | None = None,
        error_type: str | None = None,
        message: str | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.status = status
        self.error_type = error_type
        detail = f": {message}" if message else ""
        kind = f" ({error_type})" if error_type else ""
        super().__init__(f"sandbox {sandbox_id} is not running (status {status}){kind}{detail}")


class SandboxOOMError(SandboxNotRunningError):
    """The sandbox was killed for running out of memory."""


class SandboxTimeoutError(SandboxNotRunningError):
    """The sandbox exceeded its timeout_minutes and was stopped."""


class SandboxImagePullError(SandboxNotRunningError):
    """The sandbox's image could not be pulled."""


class CommandTimeoutError(RuntimeError):
    """execute_command ran past its timeout; the command was killed."""

    def __init__(self, sandbox_id: str, command: str, timeout: float) -> None:
        super().__init__(f"command {command!r} timed out after {timeout}s in sandbox {sandbox_id}")
        self.sandbox_id = sandbox_id


class UploadTimeoutError(RuntimeError):
    """An upload did not finish in time."""

    def __init__(self, sandbox_id: str, path: str, timeout: float) -> None:
        super().__init__(f"upload to {path!r} timed out after {timeout}s in sandbox {sandbox_id}")


class DownloadTimeoutError(RuntimeError):
    """A download did not finish in time."""

    def __init__(self, sandbox_id: str, path: str, timeout: float) -> None:
        super().__init__(f"download of {path!r} timed out after {timeout}s in sandbox {sandbox_id}")


NOT_RUNNING_BY_ERROR_TYPE: dict[str, type[SandboxNotRunningError]] = {
    ErrorType.OOM_KILLED: SandboxOOMError,
    ErrorType.TIMEOUT: SandboxTimeoutError,
    ErrorType.IMAGE_PULL_FAILED: SandboxImagePullError,
}


def not_running(
    sandbox_id: str, status: str | None, error_type: str | None, message: str | None
) -> SandboxNotRunningError:
    """The typed not-running error for a sandbox's status and errorType."""
    kind = NOT_RUNNING_BY_ERROR_TYPE.get(error_type or "", SandboxNotRunningError)
    return kind(sandbox_id, status, error_type, message)
