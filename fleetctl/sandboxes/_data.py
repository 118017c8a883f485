"""The data plane's operations: exec, files and background jobs, through a sandbox's gateway.

Exec goes over the gateway's Connect command session when the server offers it (today's
API) and over REST `/exec` otherwise (0.2 servers): the first Connect call to a gateway
that answers a plain 404 switches that gateway to REST for good, and the caller sees
the same `CommandResponse` either way.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from google.protobuf.message import Message

from fleetctl.contract import DEFAULT_EXEC_TIMEOUT_S, MAX_BATCH, MAX_EXEC_TIMEOUT_S
from fleetctl.proto import command_session_pb2 as pb
from fleetctl.sandboxes import _connect, errors
from fleetctl.sandboxes._calls import Call, Op, model, ok, sandbox_path
from fleetctl.sandboxes._calls import unsupported as unsupported_endpoint
from fleetctl.sandboxes._control import ControlOps, Gateway
from fleetctl.sandboxes.errors import ConnectFailure
from fleetctl.sandboxes.models import (
    BackgroundJob,
    BackgroundJobStatus,
    BackgroundJobStatusSnapshot,
    BatchBackgroundJobStatusResponse,
    CommandResponse,
    FileUploadResponse,
    ReadFileResponse,
)

JOB_LOG_WINDOW = 10 * 1024 * 1024
#: Extra seconds the transport waits beyond a command's own timeout.
GRACE_S = 10


class DataOps(ControlOps):
    """Exec, files and background jobs; remembers which gateways speak Connect."""

    def __init__(self, *, vm_only: bool = False) -> None:
        super().__init__(vm_only=vm_only)
        #: Gateway roots known to answer (True) or not to offer (False) the command session.
        self.connect_offered: dict[str, bool] = {}

    # -- exec ----------------------------------------------------------------------

    def execute_command(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
        user: str | None = None,
    ) -> Op[CommandResponse]:
        """Run `command` in a shell, as `user` (a name or id of the sandbox's, optionally
        with :group; default: the image's user) when given."""
        limit = DEFAULT_EXEC_TIMEOUT_S if timeout is None else timeout
        if not 0 < limit <= MAX_EXEC_TIMEOUT_S:
            raise ValueError(f"timeout must be between 1 and {MAX_EXEC_TIMEOUT_S} seconds")
        gateway = yield from self.gateway(sandbox_id)
        if self.connect_offered.get(gateway.root, True):
            spec = pb.CommandSpec(cmd="/bin/sh", args=["-c", command], envs=dict(env or {}))
            if working_dir is not None:
                spec.cwd = working_dir
            if user is not None:
                spec.user = user
            try:
                events = yield from self.connect_stream(
                    sandbox_id, "Start", pb.StartRequest(command=spec, stdin=False), limit
                )
            except ConnectFailure as failure:
                if failure.code == "deadline_exceeded":
                    yield from self.raise_unless_running(sandbox_id)
                    raise errors.CommandTimeoutError(sandbox_id, command, limit) from None
                if failure.code != "unimplemented":
                    raise
            else:
                return _collected(events)
        return (yield from self._rest_exec(sandbox_id, command, working_dir, env, limit, user))

    def _rest_exec(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None,
        env: Mapping[str, str] | None,
        limit: int,
        user: str | None,
    ) -> Op[CommandResponse]:
        body = {"command": command, "working_dir": working_dir, "env": dict(env or {}),
                "sandbox_id": sandbox_id, "timeout": limit, "user": user}  # fmt: skip
        response = yield from self._gateway_call(
            sandbox_id, "POST", "exec", json=body, timeout=limit + GRACE_S, retryable=False
        )
        if response.status_code == 408:
            raise errors.CommandTimeoutError(sandbox_id, command, limit)
        return model(CommandResponse, ok(response))

    def connect_stream(
        self, sandbox_id: str, method: str, message: Message, timeout: float
    ) -> Op[list[pb.CommandSessionEvent]]:
        """A server-streaming Connect call, read whole: its events, up to its end.

        Raises ConnectFailure (code `unimplemented` for a gateway without the command
        session, which is remembered), or the typed not-running error for `not_found`."""
        for attempt in range(2):
            gateway = yield from self.gateway(sandbox_id)
            response: httpx.Response = yield _connect_call(
                gateway, method, _connect.envelope(message.SerializeToString()), timeout,
                stream=True, retryable=False,
            )  # fmt: skip
            decoder = _connect.Decoder()
            events: list[pb.CommandSessionEvent] = []
            try:
                _connect.check_stream(
                    response.status_code, response.headers.get("content-type", ""), response.content
                )
                events, failure = decoder.feed(response.content)
                if failure is not None:
                    raise failure
                decoder.finish()
            except ConnectFailure as failure:
                if failure.code == "unauthenticated" and attempt == 0 and not events:
                    self.forget_gateway(sandbox_id)
                    continue
                yield from self.noted(sandbox_id, gateway, failure)
                raise failure
            self.connect_offered[gateway.root] = True
            return events
        raise AssertionError("unreachable")

    def connect_unary(
        self, sandbox_id: str, method: str, message: Message, timeout: float
    ) -> Op[bytes]:
        """A unary Connect call (retried through the transport: each carries its own id,
        so the server does it once); its response message. Raises as `connect_stream`."""
        for attempt in range(2):
            gateway = yield from self.gateway(sandbox_id)
            response: httpx.Response = yield _connect_call(
                gateway, method, message.SerializeToString(), timeout, stream=False,
                retryable=True,
            )  # fmt: skip
            if response.status_code == 200:
                return response.content
            failure = _connect.unary_error(response.status_code, response.content)
            if failure.code == "unauthenticated" and attempt == 0:
                self.forget_gateway(sandbox_id)
                continue
            yield from self.noted(sandbox_id, gateway, failure)
            raise failure
        raise AssertionError("unreachable")

    def noted(self, sandbox_id: str, gateway: Gateway, failure: ConnectFailure) -> Op[None]:
        """What a failure says: a gateway without the command session (remembered), or a
        sandbox not running (its typed error is raised)."""
        if failure.code == "unimplemented":
            self.connect_offered[gateway.root] = False
        elif failure.code in ("not_found", "unavailable"):  # gone, or its gateway is
            yield from self.raise_unless_running(sandbox_id)
        elif failure.code == "unauthenticated":
            raise errors.UnauthorizedError(
                f"the gateway refused its token for sandbox {sandbox_id}: {failure.message}",
                status_code=401,
            )

    # -- files ---------------------------------------------------------------------

    def upload_file(
        self, sandbox_id: str, file_path: str, local_file_path: str, timeout: float = 300
    ) -> Op[FileUploadResponse]:
        response = yield from self._transfer(sandbox_id, "POST", "upload", file_path, timeout,
                                             errors.UploadTimeoutError,
                                             upload_from=local_file_path)  # fmt: skip
        return model(FileUploadResponse, response)

    def download_file(
        self, sandbox_id: str, file_path: str, local_file_path: str, timeout: float = 300
    ) -> Op[None]:
        yield from self._transfer(sandbox_id, "GET", "download", file_path, timeout,
                                  errors.DownloadTimeoutError,
                                  download_to=local_file_path)  # fmt: skip

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
        return ok(response)

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
        return model(ReadFileResponse, ok(response)).model_dump()

    def _gateway_call(
        self, sandbox_id: str, method: str, operation: str, **fields: Any
    ) -> Op[httpx.Response]:
        """A data-plane call; a 401 clears the token and retries once; not running → typed."""
        for attempt in range(2):
            gateway = yield from self.gateway(sandbox_id)
            fields.setdefault("retryable", method == "GET")
            response: httpx.Response = yield Call(
                method, f"{gateway.url}/{operation}", token=gateway.token, **fields
            )
            if response.status_code == 401 and attempt == 0:
                self.forget_gateway(sandbox_id)
                continue
            if response.status_code in (409, 410, 502) or (
                response.status_code == 404 and operation == "exec"
            ):
                yield from self.raise_unless_running(sandbox_id)
            return response
        raise AssertionError("unreachable")

    # -- background jobs -------------------------------------------------------------

    def start_background_job(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        job_id: str | None = None,
    ) -> Op[BackgroundJob]:
        """Run `command` detached; its output and exit code go to files in /tmp.

        A `job_id` you choose (letters, digits, - and _) lets another process find the
        job again. A server that keeps jobs (the local one) starts a job id once per
        sandbox, ever (a second start is a no-op), and keeps its exit code where the job
        cannot wipe it; any other server with exec and read-file gets the job through
        exec, with its state in /tmp only. The job survives this client exiting.
        """
        job_id = job_id or uuid.uuid4().hex[:12]
        if not job_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError("job_id may hold only letters, digits, - and _")
        job = BackgroundJob.for_id(job_id, sandbox_id)
        body = {"job_id": job_id, "command": command, "working_dir": working_dir,
                "env": dict(env or {})}  # fmt: skip
        # kept by the server: retried safely (a second start of the id is a no-op)
        response = yield Call("POST", sandbox_path(sandbox_id, "background-jobs"), json=body)
        if not unsupported_endpoint(response):
            if response.status_code == 409:
                yield from self.raise_unless_running(sandbox_id)
            ok(response)
            return job
        cd = f"cd {shlex.quote(working_dir)} && " if working_dir else ""
        inner = (
            f"({cd}{command}) > {job.stdout_log_file} 2> {job.stderr_log_file}; "
            f"echo $? > {job.exit_file}.tmp && mv {job.exit_file}.tmp {job.exit_file}"
        )
        detached = f"nohup sh -c {shlex.quote(inner)} < /dev/null > /dev/null 2>&1 &"
        # env goes as the exec's environment (the job inherits it), never into the command
        result = yield from self.execute_command(sandbox_id, detached, env=env, timeout=30)
        if result.exit_code != 0:
            raise errors.APIError(
                f"could not start the job in sandbox {sandbox_id}: {result.stderr.strip()}"
            )
        return job

    def started_background_jobs(self, sandbox_id: str) -> Op[list[str] | None]:
        """The ids of the jobs the server started in the sandbox (those kept by it), or
        None from a server that does not keep jobs."""
        response = yield Call("GET", sandbox_path(sandbox_id, "background-jobs"))
        if unsupported_endpoint(response):
            return None
        return [str(job["job_id"]) for job in ok(response).json()["jobs"]]

    def get_background_job(self, sandbox_id: str, job: BackgroundJob) -> Op[BackgroundJobStatus]:
        """The job's status; once it completed, its exit code and (the last 10 MB of) output.
        The status is the server's record where it keeps jobs (`get_background_job_statuses`)."""
        job = BackgroundJob.for_id(job.job_id, sandbox_id)
        (snapshot,) = yield from self.get_background_job_statuses([job])
        return (yield from self._hydrated(job, snapshot))

    def get_background_job_statuses(
        self, jobs: Sequence[BackgroundJob]
    ) -> Op[list[BackgroundJobStatusSnapshot]]:
        """Whether each job completed, and its exit code, in one call per 100 jobs (in the
        order given); output is not read. A job whose sandbox is gone raises."""
        _unique_jobs(jobs)
        found: dict[tuple[str, str], BackgroundJobStatusSnapshot] = {}
        for start in range(0, len(jobs), MAX_BATCH):
            chunk = jobs[start : start + MAX_BATCH]
            body = {"jobs": [{"sandbox_id": j.sandbox_id, "job_id": j.job_id} for j in chunk]}
            response = yield Call("POST", "/sandbox/background-jobs/status:batchGet", json=body)
            if unsupported_endpoint(response):  # an older API: read each job's exit file
                for job in chunk:
                    snapshot = yield from self._job_snapshot(job.sandbox_id, job)
                    found[job.sandbox_id, job.job_id] = snapshot
                continue
            batch = model(BatchBackgroundJobStatusResponse, ok(response))
            for error in batch.errors:
                if error.code == "NOT_RUNNING":
                    yield from self.raise_unless_running(error.sandbox_id)
                raise errors.APIError(f"background job {error.sandbox_id}/{error.job_id}: "
                                      f"{error.code}: {error.message}")  # fmt: skip
            found.update(((s.sandbox_id, s.job_id), s) for s in batch.statuses)
        missing = [
            f"{j.sandbox_id}/{j.job_id}" for j in jobs if (j.sandbox_id, j.job_id) not in found
        ]
        if missing:
            raise errors.APIError(f"background job status omitted {', '.join(missing)}")
        return [found[j.sandbox_id, j.job_id] for j in jobs]

    def get_background_jobs(self, jobs: Sequence[BackgroundJob]) -> Op[list[BackgroundJobStatus]]:
        """`get_background_job` of many jobs: their statuses in batches, then the output
        of those that completed."""
        snapshots = yield from self.get_background_job_statuses(jobs)
        results = []
        for job, snapshot in zip(jobs, snapshots, strict=True):
            results.append((yield from self._hydrated(job, snapshot)))
        return results

    def _job_snapshot(self, sandbox_id: str, job: BackgroundJob) -> Op[BackgroundJobStatusSnapshot]:
        try:
            exit_text = (yield from self.read_file(sandbox_id, job.exit_file))["content"].strip()
        except errors.SandboxFileNotFoundError:
            exit_text = ""
        done = exit_text.lstrip("-").isdigit()
        return BackgroundJobStatusSnapshot(sandbox_id=sandbox_id, job_id=job.job_id,
                                           completed=done,
                                           exit_code=int(exit_text) if done else None)  # fmt: skip

    def _hydrated(
        self, job: BackgroundJob, snapshot: BackgroundJobStatusSnapshot
    ) -> Op[BackgroundJobStatus]:
        if not snapshot.completed:
            return BackgroundJobStatus(job_id=job.job_id, completed=False)
        outputs: list[tuple[str, bool]] = []
        for path in (job.stdout_log_file, job.stderr_log_file):
            try:
                read = yield from self.read_file(job.sandbox_id, path, -JOB_LOG_WINDOW,
                                                 JOB_LOG_WINDOW)  # fmt: skip
                outputs.append((str(read["content"]), bool(read.get("truncated"))))
            except errors.SandboxFileNotFoundError:
                outputs.append(("", False))
        (stdout, out_cut), (stderr, err_cut) = outputs
        return BackgroundJobStatus(job_id=job.job_id, completed=True, exit_code=snapshot.exit_code,
                                   stdout=stdout, stderr=stderr, stdout_truncated=out_cut,
                                   stderr_truncated=err_cut)  # fmt: skip


def _connect_call(
    gateway: Gateway, method: str, body: bytes, timeout: float, *, stream: bool, retryable: bool
) -> Call:
    return Call("POST", f"{gateway.url}/{_connect.path(method)}", token=gateway.token,
                content=body, headers=_connect.headers(timeout, stream=stream),
                timeout=timeout + GRACE_S, retryable=retryable)  # fmt: skip


def _collected(events: Sequence[pb.CommandSessionEvent]) -> CommandResponse:
    """An exec's output and exit code from its events (output decoded once, whole)."""
    out, err = bytearray(), bytearray()
    exit_code: int | None = None
    for event in events:
        which = event.WhichOneof("event")
        if which == "data":
            kind = event.data.WhichOneof("output")
            (err if kind == "stderr" else out).extend(getattr(event.data, kind or "stdout"))
        elif which == "end":
            exit_code = event.end.exit_code
    if exit_code is None:
        raise errors.APIError("the command's stream ended without an exit code")
    return CommandResponse(stdout=out.decode("utf-8", "replace"),
                           stderr=err.decode("utf-8", "replace"), exit_code=exit_code)  # fmt: skip


def _unique_jobs(jobs: Sequence[BackgroundJob]) -> None:
    if not jobs:
        raise ValueError("jobs must hold at least one job")
    if len({(j.sandbox_id, j.job_id) for j in jobs}) != len(jobs):
        raise ValueError("jobs must not repeat a job")
