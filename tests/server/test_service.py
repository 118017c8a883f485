"""Lifetime timeout (with an injected clock) and OOM, on real sandboxes in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest

from fleetctl.server import api
from fleetctl.server.runtime.bwrap import BwrapRuntime
from fleetctl.server.runtime.bwrap.host import probe
from fleetctl.server.runtime.bwrap.network import Networks, host_resolvers
from fleetctl.server.service import NotRunning, SandboxService, Settings
from fleetctl.server.store import Store, utcnow
from tests.conftest import needs_sandboxes, traversable_dir

pytestmark = [pytest.mark.anyio, needs_sandboxes]


@dataclass
class FakeClock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def service() -> AsyncIterator[tuple[SandboxService, FakeClock]]:
    clock = FakeClock(utcnow())
    with traversable_dir() as base:
        data_dir = base / "data"
        data_dir.mkdir()
        store = Store(data_dir / "state.db")
        networks = Networks(host_resolvers())
        runtime = BwrapRuntime(data_dir, probe(), networks)
        service = SandboxService(store, runtime, Settings(data_dir=data_dir, clock=clock))
        async with anyio.create_task_group() as group:
            await service.run(group, monitor_interval=3600)
            try:
                yield service, clock
            finally:
                await service.shutdown()
                group.cancel_scope.cancel()
        store.close()
        networks.close()
        assert not list((data_dir / "sandboxes").iterdir())


async def running(service: SandboxService, **fields: object) -> str:
    record = await service.sandboxes.create(
        api.CreateSandbox.model_validate(
            {"name": "svc", "docker_image": "python:3.11-slim", "memory_gb": 0.5, **fields}
        )
    )
    with anyio.fail_after(30):
        while service.sandboxes.get(record.id).status != "RUNNING":
            assert service.sandboxes.get(record.id).status in ("PENDING", "PROVISIONING")
            await anyio.sleep(0.01)
    return record.id


async def test_lifetime_timeout_is_enforced_with_status_and_error_type(
    service: tuple[SandboxService, FakeClock],
) -> None:
    svc, clock = service
    sandbox_id = await running(svc, timeout_minutes=1)
    handle = svc.sandboxes.running(sandbox_id)[1]
    clock.now += timedelta(seconds=59)
    await svc.monitor.tick()
    assert svc.sandboxes.get(sandbox_id).status == "RUNNING"
    clock.now += timedelta(seconds=2)
    await svc.monitor.tick()
    record = svc.sandboxes.get(sandbox_id)
    assert (record.status, record.error_type) == ("TIMEOUT", "TIMEOUT")
    assert not svc.runtime.usage(handle).alive
    assert isinstance(svc.runtime, BwrapRuntime)
    assert not Path(svc.runtime.sandbox_dir(sandbox_id)).exists()


async def test_oom_under_64_mb_is_reported_as_oom_killed(
    service: tuple[SandboxService, FakeClock],
) -> None:
    svc, _ = service
    sandbox_id = await running(svc, memory_gb=0.0625)
    with pytest.raises(NotRunning):
        await svc.data.exec(
            sandbox_id,
            api.ExecRequest(command="python3 -c 'b = bytearray(256 * 1024 * 1024)'", timeout=60),
        )
    record = svc.sandboxes.get(sandbox_id)
    assert (record.status, record.error_type) == ("ERROR", "OOM_KILLED")


async def test_oom_of_the_main_process_is_found_by_the_monitor(
    service: tuple[SandboxService, FakeClock],
) -> None:
    svc, _ = service
    sandbox_id = await running(
        svc,
        memory_gb=0.0625,
        start_command="while [ ! -e /tmp/go ]; do sleep 0.05; done; "
        "exec python3 -c 'b = bytearray(256 << 20)'",
    )
    await svc.data.exec(sandbox_id, api.ExecRequest(command="touch /tmp/go"))
    with anyio.fail_after(30):
        while svc.sandboxes.get(sandbox_id).status == "RUNNING":
            await svc.monitor.tick()
            await anyio.sleep(0.02)
    record = svc.sandboxes.get(sandbox_id)
    assert (record.status, record.error_type) == ("ERROR", "OOM_KILLED")


async def test_strict_image_policy_fails_unknown_images(
    service: tuple[SandboxService, FakeClock],
) -> None:
    svc, _ = service
    strict = SandboxService(
        svc.store,
        svc.runtime,
        Settings(data_dir=svc.shared.settings.data_dir, image_policy="pull"),
    )
    async with anyio.create_task_group() as group:
        strict.sandboxes.run(group)
        record = await strict.sandboxes.create(api.CreateSandbox(name="s", docker_image="nope:1"))
    final = svc.sandboxes.get(record.id)
    assert (final.status, final.error_type) == ("ERROR", "IMAGE_PULL_FAILED")
    assert "nope:1" in (final.error_message or "")
