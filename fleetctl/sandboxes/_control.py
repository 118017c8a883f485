"""The control plane's operations: sandboxes' lifecycle, status, logs, exposures, and the
gateway tokens the data plane needs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetctl.contract import FINAL_STATUSES, MAX_BATCH, ErrorType, SandboxStatus
from fleetctl.sandboxes import errors
from fleetctl.sandboxes._calls import Call, Op, Sleep, json_object, model, ok, sandbox_path
from fleetctl.sandboxes._calls import unsupported as unsupported_endpoint
from fleetctl.sandboxes.models import (
    BatchSandboxStatusResponse,
    BulkDeleteSandboxResponse,
    CreateSandboxRequest,
    ExposedPort,
    GatewayAuth,
    ListExposedPortsResponse,
    Logs,
    Sandbox,
    SandboxListResponse,
    SandboxStatusLookupError,
    SandboxStatusSnapshot,
    StartCommand,
)

TOKEN_MARGIN = timedelta(seconds=60)
#: The first poll of a wait comes this soon; later ones back off to POLL_MAX.
POLL_FIRST = 0.05
POLL_MAX = 2.0


@dataclass(frozen=True, slots=True)
class Gateway:
    """A sandbox's data plane: its base URL and token, and the gateway's own root URL."""

    url: str
    token: str = field(repr=False)
    expires: datetime
    root: str


class ControlOps:
    """The control plane's operations; holds the gateway token cache.

    `vm_only`: the API runs only VM sandboxes (today's cloud): every create says
    `vm: true`, a string start command is sent as `/bin/sh -c` (as today's SDK must), and
    `network_access=False` as an empty allowlist (today's API has no `network_access`).
    """

    def __init__(self, *, vm_only: bool = False) -> None:
        self.vm_only = vm_only
        self._gateways: dict[str, Gateway] = {}

    def clear_auth_cache(self) -> None:
        self._gateways.clear()

    def create(self, request: CreateSandboxRequest) -> Op[Sandbox]:
        body = request.model_dump(exclude_none=True)
        if request.checkpoint_id is not None:  # its files, its size
            body.pop("disk_size_gb", None)
        if self.vm_only:
            body["vm"] = True
            if not body.pop("network_access") and request.network_denylist is None:
                body.setdefault("network_allowlist", [])
            if isinstance(request.start_command, str):
                shell = StartCommand(executable="/bin/sh", args=["-c", request.start_command])
                body["start_command"] = shell.model_dump()
        # always sent, so that retrying a create can never make a second sandbox
        body["idempotency_key"] = request.idempotency_key or uuid.uuid4().hex
        response = yield Call("POST", "/sandbox", json=body)
        return model(Sandbox, ok(response))

    def get(self, sandbox_id: str) -> Op[Sandbox]:
        return model(Sandbox, ok((yield Call("GET", sandbox_path(sandbox_id)))))

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
        return model(SandboxListResponse, ok(response))

    def delete(self, sandbox_id: str) -> Op[dict[str, Any]]:
        self._gateways.pop(sandbox_id, None)
        return json_object(ok((yield Call("DELETE", sandbox_path(sandbox_id)))))

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
        return model(BulkDeleteSandboxResponse, ok(response))

    def resolve_image(self, image: str) -> Op[str]:
        """The manifest digest `image`'s tag names now, for this machine's platform (an
        extension of fleetctl's local server: it asks the image's registry)."""
        response = yield Call("POST", "/_fleetctl/images/resolve", json={"name": image})
        return str(json_object(ok(response))["digest"])

    def get_logs(self, sandbox_id: str) -> Op[str]:
        return model(Logs, ok((yield Call("GET", sandbox_path(sandbox_id, "logs"))))).logs

    def wait_for_creation(self, sandbox_id: str, max_attempts: int = 60) -> Op[None]:
        """Poll until RUNNING; raise the typed not-running error if it fails instead."""
        yield from self.bulk_wait_for_creation([sandbox_id], max_attempts)

    def bulk_wait_for_creation(
        self, sandbox_ids: Sequence[str], max_attempts: int = 60
    ) -> Op[dict[str, str]]:
        """Poll batch status (≤100 ids a call) until all are RUNNING.

        Raises the typed error of the first sandbox that failed, or APITimeoutError
        naming those still pending.
        """
        pending = list(dict.fromkeys(sandbox_ids))
        delay = POLL_FIRST
        for _ in range(max_attempts * 4):
            statuses = yield from self._statuses(pending)
            for sandbox_id in pending:
                status = statuses[sandbox_id]
                if status.status in FINAL_STATUSES:
                    raise errors.not_running(
                        sandbox_id, status.status, status.error_type, status.error_message
                    )
            pending = [i for i in pending if statuses[i].status != SandboxStatus.RUNNING]
            if not pending:
                return dict.fromkeys(sandbox_ids, SandboxStatus.RUNNING.value)
            yield Sleep(delay)
            delay = min(delay * 1.5, POLL_MAX)
        raise errors.APITimeoutError(
            f"timed out waiting for sandboxes to be RUNNING; still pending: {', '.join(pending)}"
        )

    def get_sandbox_statuses(self, sandbox_ids: Sequence[str]) -> Op[BatchSandboxStatusResponse]:
        """The status of up to 100 sandboxes in one call; an id the API does not know is in
        `errors` (NOT_FOUND). Against an API without batch status, read one by one."""
        ids = batch_ids(sandbox_ids, "sandbox_ids")
        response = yield Call("POST", "/sandbox/status:batchGet", json={"sandbox_ids": ids})
        if not unsupported_endpoint(response):
            return model(BatchSandboxStatusResponse, ok(response))
        found = BatchSandboxStatusResponse(statuses=[], errors=[])
        for sandbox_id in ids:
            try:
                sandbox = yield from self.get(sandbox_id)
            except errors.APIError as exc:
                if exc.status_code != 404:
                    raise
                found.errors.append(
                    SandboxStatusLookupError(sandbox_id=sandbox_id, code="NOT_FOUND",
                                             message=str(exc))
                )  # fmt: skip
                continue
            found.statuses.append(SandboxStatusSnapshot(
                sandbox_id=sandbox_id, status=sandbox.status, error_type=sandbox.error_type,
                error_message=sandbox.error_message,
            ))  # fmt: skip
        return found

    def _statuses(self, ids: Sequence[str]) -> Op[dict[str, SandboxStatusSnapshot]]:
        """Every id's status, in batches; a sandbox the API does not know reads as
        TERMINATED with SANDBOX_NOT_FOUND (as today's SDK reads a gone sandbox)."""
        found: dict[str, SandboxStatusSnapshot] = {}
        for start in range(0, len(ids), MAX_BATCH):
            batch = yield from self.get_sandbox_statuses(ids[start : start + MAX_BATCH])
            found.update((item.sandbox_id, item) for item in batch.statuses)
            for error in batch.errors:
                found[error.sandbox_id] = SandboxStatusSnapshot(
                    sandbox_id=error.sandbox_id, status=SandboxStatus.TERMINATED,
                    error_type=ErrorType.SANDBOX_NOT_FOUND,
                    error_message=f"{error.code}: {error.message}",
                )  # fmt: skip
        missing = [i for i in ids if i not in found]
        if missing:
            raise errors.APIError(f"batch status omitted {', '.join(missing)}")
        return found

    def expose(
        self, sandbox_id: str, port: int, name: str | None = None, protocol: str = "HTTP"
    ) -> Op[ExposedPort]:
        body = {"port": port, "protocol": protocol, **({"name": name} if name else {})}
        response = yield Call("POST", sandbox_path(sandbox_id, "expose"), json=body,
                              retryable=False)  # fmt: skip
        return model(ExposedPort, ok(response))

    def unexpose(self, sandbox_id: str, exposure_id: str) -> Op[None]:
        ok((yield Call("DELETE", sandbox_path(sandbox_id, "expose", exposure_id))))

    def list_exposed_ports(self, sandbox_id: str) -> Op[ListExposedPortsResponse]:
        response = yield Call("GET", sandbox_path(sandbox_id, "expose"))
        return model(ListExposedPortsResponse, ok(response))

    def gateway(self, sandbox_id: str) -> Op[Gateway]:
        """The sandbox's data plane, from the cache while its token is good for a minute."""
        cached = self._gateways.get(sandbox_id)
        if cached is not None and cached.expires - TOKEN_MARGIN > datetime.now(UTC):
            return cached
        auth = model(GatewayAuth, ok((yield Call("POST", sandbox_path(sandbox_id, "auth")))))
        expires = auth.expires_at
        root = auth.gateway_url.rstrip("/")
        gateway = Gateway(
            url=f"{root}/{auth.user_ns}/{auth.job_id}",
            token=auth.token,
            expires=expires if expires.tzinfo else expires.replace(tzinfo=UTC),
            root=root,
        )
        self._gateways[sandbox_id] = gateway
        return gateway

    def forget_gateway(self, sandbox_id: str) -> None:
        """Its token was refused: the next call asks for a new one."""
        self._gateways.pop(sandbox_id, None)

    def raise_unless_running(self, sandbox_id: str) -> Op[None]:
        """Raise the sandbox's typed not-running error, unless it is RUNNING after all."""
        sandbox = yield from self.get(sandbox_id)
        if sandbox.status != SandboxStatus.RUNNING:
            raise errors.not_running(
                sandbox_id, sandbox.status, sandbox.error_type, sandbox.error_message
            )


def batch_ids(values: Sequence[str], name: str) -> list[str]:
    """A batch call's ids: 1 to 100, unique, as the API takes them."""
    ids = list(values)
    if not 0 < len(ids) <= MAX_BATCH:
        raise ValueError(f"{name} must hold 1 to {MAX_BATCH} ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} must not repeat an id")
    return ids
