"""Replica expansion: a validated FleetSpec becomes the desired sandboxes, one per key.

The result is plain frozen data the planner compares with live state. Nothing
here reads a secret's value: secrets stay references until apply time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetctl.spec.models import (
    SETTING_DEFAULTS,
    Egress,
    Exposure,
    FileSpec,
    FleetSpec,
    Job,
    Prepare,
    SandboxGroup,
    SandboxSettings,
    SecretRef,
)

#: Environment variable every sandbox gets: its replica index (0 for unreplicated groups).
REPLICA_ENV = "FLEETCTL_REPLICA"


@dataclass(frozen=True, slots=True)
class DesiredSandbox:
    """One sandbox as the spec wants it. `key` is its identity within the fleet."""

    fleet: str
    key: str
    group: str
    replica: int
    #: The image, or None when the sandbox starts from `from_checkpoint`.
    image: str | None
    from_checkpoint: str | None
    prepare: Prepare | None
    start_command: str | None
    cpu_cores: float
    memory_gb: float
    disk_size_gb: int
    timeout_minutes: int
    idle_timeout_minutes: int | None
    network_access: bool
    env: Mapping[str, str]
    secrets: Mapping[str, SecretRef]
    labels: tuple[str, ...]
    files: tuple[FileSpec, ...]
    expose: tuple[Exposure, ...]
    jobs: tuple[Job, ...]
    egress: Egress | None = None

    def to_dict(self) -> dict[str, Any]:
        """A display form with secrets redacted to their source (`<secret:from_env:NAME>`)."""
        return {
            **self.to_record(),
            "secrets": {name: ref.redacted() for name, ref in self.secrets.items()},
        }

    def to_record(self) -> dict[str, Any]:
        """A lossless form for saved plans: secrets as their references, never values."""
        return {
            "fleet": self.fleet,
            "key": self.key,
            "group": self.group,
            "replica": self.replica,
            "image": self.image,
            "from_checkpoint": self.from_checkpoint,
            "prepare": self.prepare.model_dump() if self.prepare else None,
            "start_command": self.start_command,
            "cpu_cores": self.cpu_cores,
            "memory_gb": self.memory_gb,
            "disk_size_gb": self.disk_size_gb,
            "timeout_minutes": self.timeout_minutes,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "network_access": self.network_access,
            "env": dict(self.env),
            "secrets": {name: ref.model_dump() for name, ref in self.secrets.items()},
            "labels": list(self.labels),
            "files": [f.model_dump() for f in self.files],
            "expose": [e.model_dump() for e in self.expose],
            "jobs": [j.model_dump() for j in self.jobs],
            "egress": self.egress.model_dump() if self.egress else None,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> DesiredSandbox:
        """The inverse of to_record (raises pydantic's ValidationError or KeyError)."""
        return cls(
            **{k: data[k] for k in ("fleet", "key", "group", "replica", "image",
                                    "start_command", "cpu_cores", "memory_gb", "disk_size_gb",
                                    "timeout_minutes", "network_access")},
            from_checkpoint=data.get("from_checkpoint"),
            prepare=Prepare.model_validate(data["prepare"]) if data.get("prepare") else None,
            idle_timeout_minutes=data.get("idle_timeout_minutes"),
            env=dict(data["env"]),
            secrets={n: SecretRef.model_validate(r) for n, r in data["secrets"].items()},
            labels=tuple(data["labels"]),
            files=tuple(FileSpec.model_validate(f) for f in data["files"]),
            expose=tuple(Exposure.model_validate(e) for e in data["expose"]),
            jobs=tuple(Job.model_validate(j) for j in data["jobs"]),
            egress=Egress.model_validate(data["egress"]) if data.get("egress") else None,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fleet:
    """A loaded fleet: its name, the file it came from, and its desired sandboxes."""

    name: str
    source: str
    labels: tuple[str, ...]
    sandboxes: tuple[DesiredSandbox, ...]


def merged(defaults: SandboxSettings, group: SandboxGroup) -> dict[str, Any]:
    """A group's settings with `defaults:` filled in, then the built-in defaults.

    Scalars: the group wins. env and secrets: merged per key, the group wins.
    labels: defaults' then the group's. files, expose, jobs: the group's list
    replaces the defaults' list when given.
    """
    out: dict[str, Any] = {}
    for name in SandboxSettings.model_fields:
        mine, theirs = getattr(group, name), getattr(defaults, name)
        if name in ("env", "secrets"):
            out[name] = {**(theirs or {}), **(mine or {})}
        elif name == "labels":
            out[name] = list(dict.fromkeys([*(theirs or []), *(mine or [])]))
        elif mine is not None:
            out[name] = mine
        elif theirs is not None:
            out[name] = theirs
        else:
            out[name] = SETTING_DEFAULTS.get(
                name, [] if name in ("files", "expose", "jobs") else None
            )
    return out


def group_keys(group: SandboxGroup) -> Iterator[tuple[int, str]]:
    """(replica index, key) for each sandbox of a group: `name-i` with replicas, else `name`."""
    if group.replicas is None:
        yield 0, group.name
        return
    for index in range(group.replicas):
        yield index, f"{group.name}-{index}"


def expand(spec: FleetSpec, spec_file: Path) -> Fleet:
    """Expand a validated spec into its desired sandboxes (file sources made absolute)."""
    spec_dir = spec_file.parent
    sandboxes: list[DesiredSandbox] = []
    for group in spec.sandboxes:
        settings = merged(spec.defaults, group)
        files = tuple(
            FileSpec(source=str((spec_dir / f.source).resolve()), target=f.target)
            for f in settings["files"]
        )
        labels = tuple(dict.fromkeys([*spec.labels, *settings["labels"]]))
        for replica, key in group_keys(group):
            sandboxes.append(
                DesiredSandbox(
                    fleet=spec.name,
                    key=key,
                    group=group.name,
                    replica=replica,
                    # with a checkpoint to start from, an image (of `defaults:`) is unused
                    image=None if settings["from_checkpoint"] else settings["image"],
                    from_checkpoint=settings["from_checkpoint"],
                    prepare=settings["prepare"],
                    start_command=settings["start_command"],
                    cpu_cores=settings["cpu_cores"],
                    memory_gb=settings["memory_gb"],
                    disk_size_gb=settings["disk_size_gb"],
                    timeout_minutes=settings["timeout_minutes"],
                    idle_timeout_minutes=settings["idle_timeout_minutes"],
                    network_access=settings["network_access"],
                    env={**settings["env"], REPLICA_ENV: str(replica)},
                    secrets=dict(settings["secrets"]),
                    labels=labels,
                    files=files,
                    expose=tuple(settings["expose"]),
                    jobs=tuple(settings["jobs"]),
                    egress=settings["egress"],
                )
            )
    return Fleet(spec.name, str(spec_file), tuple(spec.labels), tuple(sandboxes))
