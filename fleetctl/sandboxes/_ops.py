"""What every SDK method does, written once for both clients.

Each operation is a generator: it yields the I/O it needs (a `Call` or a
`Sleep`) and receives the result, so the sync and async clients differ only
in the small driver that performs those steps (`client.py`). Retries and
backoff live in the drivers' transport; the decisions here are about meaning:
which status maps to which error, gateway tokens, polling.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from fleetctl.contract import (
    DEFAULT_EXEC_TIMEOUT_S,
    FINAL_STATUSES,
    MAX_BATCH,
    MAX_EXEC_TIMEOUT_S,
    ErrorType,
    SandboxStatus,
)
from fleetctl.sandboxes import errors
from fleetctl.sandboxes.models import (
    BackgroundJob,
    BackgroundJobStatus,
    BatchStatus,
    BulkDeleteSandboxResponse,
    CommandResponse,
    CreateSandboxRequest,
    ExposedPort,
    FileUploadResponse,
    GatewayAuth,
    ListExposedPortsResponse,
    Logs,
    ReadFileResponse,
    Sandbox,
    SandboxListResponse,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

TOKEN_MARGIN = timedelta(seconds=60)
JOB_LOG_WINDOW = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request. `path` is under /api/v1 unless `token` (a gateway call, full URL)."""

    method: str
    path: str
    json: Any = None
    params: Any = None
    token: str | None = None
    retryable: bool = True
    timeout: float | None = None
    upload_from: str | None = None
    download_to: str | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step = Call | Sleep
Op = Generator[Step, Any, T]


@dataclass(frozen=True, slots=True)
class _Gateway:
    url: str
    token: str
    expires: datetime


class Operations:
    """The SDK's behaviour, free of I/O; holds the gateway token cache."""

    def __init__(self) -> None:
        self._gateways: dict[str, _Gateway] = {}

    def clear_auth_cache(self) -> None:
        self._gateways.clear()

    # -- control plane -----------------------------------------------------------

    def create(self, request: CreateSandboxRequest) -> Op[Sandbox]:
        body = request.model_dump(exclude_none=True)
        # always sent, so that retrying a create can never make a second sandbox
        body["idempotency_key"] = request.idempotency_key or uuid.uuid4().hex
        response = yield Call("POST", "/sandbox", json=body)
        return _model(Sandbox, _ok(response))

    def get(self, sandbox_id: str) -> Op[Sandbox]:
        return _model(Sandbox, _ok((yield Call("GET", _path(sandbox_id)))))

    def list(
        self,
        labels: Sequence[str] | None = None,
        page: int = 1,
        per_page: int = 50,
        status: str | None = None,
        exclude_terminated: bool | None = None,
    ) -> Op[SandboxListResponse]:
        params: dict[str, Any] = {"page": page, "per_page": per_page}
        if labels:
            params["labels"] = list(labels)
        if status:
            params["status"] = status
        if exclude_terminated is not None:
            params["is_active"] = "true" if exclude_terminated else "false"
        response = yield Call("GET", "/sandbox", params=params)
        return _model(SandboxListResponse, _ok(response))

    def delete(self, sandbox_id: str) -> Op[dict[str, Any]]:
        self._gateways.pop(sandbox_id, None)
        return _object(_ok((yield Call("DELETE", _path(sandbox_id)))))

    def bulk_delete(
        self, sandbox_ids: Sequence[str] | None = None, labels: Sequence[str] | None = None
    ) -> Op[BulkDeleteSandboxResponse]:
        if (sandbox_ids is None) == (labels is None):
            raise ValueError("pass exactly one of sandbox_ids or labels")
        body = (
            {"sandbox_ids": list(sandbox_ids)}
            if sandbox_ids is not None
            else {"labels": list(labels or [])}
        )
        response = yield Call("DELETE", "/sandbox", json=body)
        return _model(BulkDeleteSandboxResponse, _ok(response))

    def get_logs(self, sandbox_id: str) -> Op[str]:
        return _model(Logs, _ok((yield Call("GET", _path(sandbox_id, "logs"))))).logs

    def wait_for_creation(self, sandbox_id: str, max_attempts: int = 60) -> Op[None]:
        """Poll until RUNNING; raise the typed not-running error if it fails instead."""
        delay = 0.05
        for _ in range(max_attempts * 4):
            sandbox = yield from self.get(sandbox_id)
            if sandbox.status == SandboxStatus.RUNNING:
                return
            if sandbox.status in FINAL_STATUSES:
                raise errors.not_running(
                    sandbox_id, sandbox.status, sandbox.error_type, sandbox.error_message
                )
            yield Sleep(delay)
            delay = min(delay * 1.5, 2.0)
        raise errors.APITimeoutError(f"sandbox {sandbox_id} was not RUNNING in time")

    def bulk_wait_for_creation(
        self, sandbox_ids: Sequence[str], max_attempts: int = 60
    ) -> Op[dict[str, str]]:
        """Poll batch status (≤100 ids a call) until all are RUNNING.

        Raises the typed error of the first sandbox that failed, or APITimeoutError
        naming those still pending.
        """
        pending = list(dict.fromkeys(sandbox_ids))
        delay = 0.05
        for _ in range(max_attempts * 4):
            statuses = yield from self._statuses(pending)
            for sandbox_id in pending:
                status, error_type, message = statuses.get(sandbox_id, (None, None, None))
                if status in FINAL_STATUSES:
                    raise errors.not_running(sandbox_id, status, error_type, message)
            pending = [i for i in pending if statuses.get(i, (None,))[0] != SandboxStatus.RUNNING]
            if not pending:
                return dict.fromkeys(sandbox_ids, SandboxStatus.RUNNING.value)
            yield Sleep(delay)
            delay = min(delay * 1.5, 2.0)
        raise errors.APITimeoutError(
            f"timed out waiting for sandboxes to be RUNNING; still pending: {', '.join(pending)}"
        )

    def _statuses(
        self, ids: Sequence[str]
    ) -> Op[dict[str, tuple[str | None, str | None, str | None]]]:
        found: dict[str, tuple[str | None, str | None, str | None]] = {}
        for start in range(0, len(ids), MAX_BATCH):
            chunk = list(ids[start : start + MAX_BATCH])
            response = yield Call("POST", "/sandbox/status:batchGet", json={"sandbox_ids": chunk})
            if response.status_code == 404:  # an API without batch status: read one by one
                for sandbox_id in chunk:
                    sandbox = yield from self.get(sandbox_id)
                    found[sandbox_id] = (sandbox.status, sandbox.error_type, sandbox.error_message)
                continue
            batch = _model(BatchStatus, _ok(response))
            for item in batch.statuses:
                found[item.sandbox_id] = (item.status, item.error_type, item.error_message)
            for error in batch.errors:  # gone: as today's SDK reads a gone sandbox
                found[error.sandbox_id] = (SandboxStatus.TERMINATED, ErrorType.SANDBOX_NOT_FOUND,
                                           f"{error.code}: {error.message}")  # fmt: skip
        return found

    def expose(
        self, sandbox_id: str, port: int, name: str | None = None, protocol: str = "HTTP"
    ) -> Op[ExposedPort]:
        body = {"port": port, "protocol": protocol, **({"name": name} if name else {})}
        response = yield Call("POST", _path(sandbox_id, "expose"), json=body, retryable=False)
        return _model(ExposedPort, _ok(response))

    def unexpose(self, sandbox_id: str, exposure_id: str) -> Op[None]:
        _ok((yield Call("DELETE", _path(sandbox_id, "expose", exposure_id))))

    def list_exposed_ports(self, sandbox_id: str) -> Op[ListExposedPortsResponse]:
        response = yield Call("GET", _path(sandbox_id, "expose"))
        return _model(ListExposedPortsResponse, _ok(response))

    # -- data plane ----------------------------------------------------------------

    def execute_command(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
    ) -> Op[CommandResponse]:
        limit = DEFAULT_EXEC_TIMEOUT_S if timeout is None else timeout
        if not 0 < limit <= MAX_EXEC_TIMEOUT_S:
            raise ValueError(f"timeout must be between 1 and {MAX_EXEC_TIMEOUT_S} seconds")
        body = {
            "command": command,
            "working_dir": working_dir,
            "env": dict(env or {}),
            "sandbox_id": sandbox_id,
            "timeout": limit,
        }
        response = yield from self._gateway_call(
            sandbox_id, "POST", "exec", json=body, timeout=limit + 10, retryable=False
        )
        if response.status_code == 408:
            raise errors.CommandTimeoutError(sandbox_id, command, limit)
        return _model(CommandResponse, _ok(response))

    def upload_file(
        self, sandbox_id: str, file_path: str, local_file_path: str, timeout: float = 300
    ) -> Op[FileUploadResponse]:
        response = yield from self._transfer(
            sandbox_id,
            "POST",
            "upload",
            file_path,
            timeout,
            errors.UploadTimeoutError,
            upload_from=local_file_path,
        )
        return _model(FileUploadResponse, response)

    def download_file(
        self, sandbox_id: str, file_path: str, local_file_path: str, timeout: float = 300
    ) -> Op[None]:
        yield from self._transfer(
            sandbox_id,
            "GET",
            "download",
            file_path,
            timeout,
            errors.DownloadTimeoutError,
            download_to=local_file_path,
        )

    def _transfer(
        self,
        sandbox_id: str,
        method: str,
        operation: str,
        file_path: str,
        timeout: float,
        timeout_error: type[errors.UploadTimeoutError | errors.DownloadTimeoutError],
        **fields: Any,
    ) -> Op[httpx.Response]:
        params = {"path": file_path, "sandbox_id": sandbox_id}
        response = yield from self._gateway_call(
            sandbox_id, method, operation, params=params, timeout=timeout, **fields
        )
        if response.status_code == 408:
            raise timeout_error(sandbox_id, file_path, timeout)
        return _ok(response)

    def read_file(
        self,
        sandbox_id: str,
        file_path: str,
        offset: int | None = None,
        length: int | None = None,
    ) -> Op[dict[str, Any]]:
        params: dict[str, Any] = {"path": file_path}
        if offset is not None:
            params["offset"] = offset
        if length is not None:
            params["length"] = length
        response = yield from self._gateway_call(sandbox_id, "GET", "read-file", params=params)
        if response.status_code == 404:
            raise errors.SandboxFileNotFoundError(
                f"file not found in sandbox {sandbox_id}: {file_path}", status_code=404
            )
        return _model(ReadFileResponse, _ok(response)).model_dump()

    def start_background_job(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        job_id: str | None = None,
    ) -> Op[BackgroundJob]:
        """Run `command` detached; its output and exit code go to files in /tmp.

        Works against any server with exec and read-file (the hosted cloud has no
        job endpoints), and the job survives this client exiting. A `job_id` you
        choose (letters, digits, - and _) lets another process find the job again.
        """
        job_id = job_id or uuid.uuid4().hex[:12]
        if not job_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError("job_id may hold only letters, digits, - and _")
        job = BackgroundJob.for_id(job_id, sandbox_id)
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
        cd = f"cd {shlex.quote(working_dir)} && " if working_dir else ""
        inner = (
            f"({exports}{cd}{command}) > {job.stdout_log_file} 2> {job.stderr_log_file}; "
            f"echo $? > {job.exit_file}.tmp && mv {job.exit_file}.tmp {job.exit_file}"
        )
        detached = f"nohup sh -c {shlex.quote(inner)} < /dev/null > /dev/null 2>&1 &"
        result = yield from self.execute_command(sandbox_id, detached, timeout=30)
        if result.exit_code != 0:
            raise errors.APIError(
                f"could not start the job in sandbox {sandbox_id}: {result.stderr.strip()}"
            )
        return job

    def get_background_job(self, sandbox_id: str, job: BackgroundJob) -> Op[BackgroundJobStatus]:
        try:
            exit_text = (yield from self.read_file(sandbox_id, job.exit_file))["content"].strip()
        except errors.SandboxFileNotFoundError:
            return BackgroundJobStatus(job_id=job.job_id, completed=False)
        if not exit_text.lstrip("-").isdigit():
            return BackgroundJobStatus(job_id=job.job_id, completed=False)
        outputs = []
        for path in (job.stdout_log_file, job.stderr_log_file):
            try:
                read = yield from self.read_file(sandbox_id, path, -JOB_LOG_WINDOW, JOB_LOG_WINDOW)
                outputs.append(str(read["content"]))
            except errors.SandboxFileNotFoundError:
                outputs.append("")
        return BackgroundJobStatus(
            job_id=job.job_id,
            completed=True,
            exit_code=int(exit_text),
            stdout=outputs[0],
            stderr=outputs[1],
        )

    def _gateway(self, sandbox_id: str) -> Op[_Gateway]:
        cached = self._gateways.get(sandbox_id)
        if cached is not None and cached.expires - TOKEN_MARGIN > datetime.now(UTC):
            return cached
        auth = _model(GatewayAuth, _ok((yield Call("POST", _path(sandbox_id, "auth")))))
        expires = auth.expires_at
        gateway = _Gateway(
            url=f"{auth.gateway_url.rstrip('/')}/{auth.user_ns}/{auth.job_id}",
            token=auth.token,
            expires=expires if expires.tzinfo else expires.replace(tzinfo=UTC),
        )
        self._gateways[sandbox_id] = gateway
        return gateway

    def _gateway_call(
        self, sandbox_id: str, method: str, operation: str, **fields: Any
    ) -> Op[httpx.Response]:
        """A data-plane call; a 401 clears the token and retries once; not running → typed."""
        for attempt in range(2):
            gateway = yield from self._gateway(sandbox_id)
            fields.setdefault("retryable", method == "GET")
            response: httpx.Response = yield Call(
                method, f"{gateway.url}/{operation}", token=gateway.token, **fields
            )
            if response.status_code == 401 and attempt == 0:
                self._gateways.pop(sandbox_id, None)
                continue
            if response.status_code in (409, 502) or (
                response.status_code == 404 and operation == "exec"
            ):
                sandbox = yield from self.get(sandbox_id)
                if sandbox.status != SandboxStatus.RUNNING:
                    raise errors.not_running(
                        sandbox_id, sandbox.status, sandbox.error_type, sandbox.error_message
                    )
            return response
        raise AssertionError("unreachable")


def _path(sandbox_id: str, *rest: str) -> str:
    """/sandbox/{id}/..., each part quoted: an id can never name another endpoint."""
    return "/".join(["/sandbox", *(quote(part, safe="") for part in (sandbox_id, *rest))])


def _ok(response: httpx.Response) -> httpx.Response:
    """The response if 2xx; else the API error its status maps to."""
    if response.is_success:
        return response
    detail = _detail(response)
    code = response.status_code
    if code == 401:
        raise errors.UnauthorizedError(f"HTTP 401: unauthorized ({detail})", status_code=401)
    if code == 402:
        raise errors.PaymentRequiredError(f"HTTP 402: payment required ({detail})", status_code=402)
    raise errors.APIError(f"HTTP {code}: {detail}", status_code=code)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:500]


def _object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise errors.APIError("malformed response from the API: expected a JSON object",
                              status_code=response.status_code)  # fmt: skip
    return body


def _model(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise errors.APIError(
            f"malformed {model.__name__} from the API: {str(exc).splitlines()[0]}",
            status_code=response.status_code,
        ) from None
