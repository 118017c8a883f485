"""The fleet spec, as pydantic models: what a user may write, and nothing else.

Every model forbids unknown keys (a typo is an error that suggests the closest
key). Settings left out of a sandbox group are `None` here and are filled from
`defaults:` and then from `SETTING_DEFAULTS` when replicas are expanded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fleetctl import contract
from fleetctl.contract import RESERVED_PORTS
from fleetctl.egress import MAX_ENTRIES, EgressError, check_lists

API_VERSION = "fleetctl/v1"

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
LABEL_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:=/-]{0,61}[A-Za-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ABS_PATH_PATTERN = r"^/"

#: Friendly wording for pattern mismatches (pydantic would print the regex).
PATTERN_HINTS = {
    NAME_PATTERN: "must be a DNS label: 1-63 lowercase letters, digits and '-', "
    "starting and ending with a letter or digit",
    LABEL_PATTERN: "must be 1-63 letters, digits and . _ : = / -, "
    "starting and ending with a letter or digit",
    ENV_NAME_PATTERN: "must be an environment variable name: letters, digits and '_', "
    "not starting with a digit",
    ABS_PATH_PATTERN: "must be an absolute path inside the sandbox (starting with /)",
}

#: Labels starting with this prefix are fleetctl's own bookkeeping.
RESERVED_LABEL_PREFIX = "fleetctl."


def _not_reserved_port(port: int) -> int:
    if port in RESERVED_PORTS:
        raise PydanticCustomError(
            "reserved_port",
            "port {port} is reserved by the sandbox platform ({reserved} cannot be exposed)",
            {"port": port, "reserved": contract.RESERVED_PORTS_TEXT},
        )
    return port


def _not_reserved_label(label: str) -> str:
    if label.startswith(RESERVED_LABEL_PREFIX):
        raise PydanticCustomError(
            "reserved_label", "labels starting with 'fleetctl.' are reserved for fleetctl"
        )
    return label


def _not_reserved_env(name: str) -> str:
    if name.startswith("FLEETCTL_"):
        raise PydanticCustomError(
            "reserved_env", "variables starting with FLEETCTL_ are set by fleetctl itself"
        )
    return name


def _no_inline_secret(value: Any) -> Any:
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "inline_secret",
            "inline secret values are not allowed: write {from_env: NAME} or "
            "{from_file: PATH} so the value stays out of the spec",
        )
    return value


def _env_value(value: Any) -> Any:
    # YAML types `8000` as an int and `yes` as a bool; numbers are safe to
    # stringify, booleans are ambiguous (True vs "true"), so they must be quoted.
    if isinstance(value, bool):
        raise PydanticCustomError(
            "env_bool", 'quote boolean values ("true"): environment values are strings'
        )
    if isinstance(value, int | float):
        return str(value)
    return value


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Label = Annotated[str, Field(pattern=LABEL_PATTERN), AfterValidator(_not_reserved_label)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN), AfterValidator(_not_reserved_env)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]
AbsPath = Annotated[str, Field(pattern=ABS_PATH_PATTERN, examples=["/workspace/results.json"])]
Port = Annotated[
    int,
    Field(
        ge=contract.PORT_RANGE[0],
        le=contract.PORT_RANGE[1],
        json_schema_extra={"not": {"enum": sorted(RESERVED_PORTS)}},
    ),
    AfterValidator(_not_reserved_port),
]
Minutes = Annotated[int, Field(ge=1, le=contract.MAX_TIMEOUT_MINUTES)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class SecretRef(_Model):
    """Where a secret's value comes from at apply time. The value never enters a spec,
    plan, label or log; exactly one of `from_env` and `from_file` is given."""

    from_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Read from this environment variable."
    )
    from_file: str | None = Field(
        None,
        min_length=1,
        description="Read from this file (relative to the spec file); trailing newline dropped.",
    )
    optional: bool = Field(
        False, description="When the source is missing, leave the secret out instead of failing."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> SecretRef:
        if (self.from_env is None) == (self.from_file is None):
            raise PydanticCustomError("secret_source", "give exactly one of from_env or from_file")
        return self

    def redacted(self) -> str:
        """How a secret is shown anywhere it is displayed: its source, never its value."""
        if self.from_env is not None:
            return f"<secret:from_env:{self.from_env}>"
        return f"<secret:from_file:{self.from_file}>"


SecretValue = Annotated[SecretRef, BeforeValidator(_no_inline_secret)]


class FileSpec(_Model):
    """A local file or directory copied into each sandbox of the group."""

    source: str = Field(
        min_length=1,
        description="Local path, relative to the spec file; a directory is copied whole.",
        examples=["./harness"],
    )
    target: AbsPath = Field(
        description="Absolute destination path inside the sandbox.",
        examples=["/workspace/harness"],
    )


class Exposure(_Model):
    """A port inside the sandbox made reachable from outside."""

    port: Port = Field(
        description=f"Port inside the sandbox: {contract.PORT_RANGE[0]}-{contract.PORT_RANGE[1]}, "
        f"not {contract.RESERVED_PORTS_TEXT}."
    )
    name: Name | None = Field(None, description="Name of the exposure; defaults to port-<port>.")
    protocol: Literal["HTTP", "TCP"] = Field(
        "HTTP", description="HTTP gives a URL; TCP gives a host:port endpoint."
    )


class Job(_Model):
    """A command run once per sandbox lifetime, in the background, once it is ready."""

    name: Name = Field(description="Job name, unique within its sandbox group.")
    command: str = Field(min_length=1, description="Shell command to run.")
    timeout_minutes: Minutes = Field(
        60, description=f"Kill the job after this long (1-{contract.MAX_TIMEOUT_MINUTES})."
    )
    artifacts: list[AbsPath] = Field(
        default_factory=list,
        description="Files to download to ./artifacts/<fleet>/<sandbox>/ when the job ends.",
    )


class Egress(_Model):
    """Where a sandbox with network access may connect: only to `allow`, or anywhere but
    `deny` (one of them). Entries: IPv4 addresses or CIDRs, with an optional `:PORT` or
    `:LOW-HIGH`, and hostnames (`example.com`, `*.example.com`; ports 80 and 443)."""

    allow: list[str] | None = Field(None, max_length=MAX_ENTRIES,
                                    examples=[["203.0.113.0/24:443"]])  # fmt: skip
    deny: list[str] | None = Field(None, max_length=MAX_ENTRIES, examples=[["198.51.100.7"]])

    @model_validator(mode="after")
    def _one_list(self) -> Egress:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("egress takes exactly one of allow or deny")
        try:
            check_lists(self.allow, self.deny)
        except EgressError as exc:
            raise ValueError(str(exc)) from None
        return self


class Prepare(_Model):
    """Set the group's environment up once: the command runs in one sandbox of the group's
    settings, its files are checkpointed, and every sandbox of the group starts from that
    checkpoint (later applies reuse it while the setup is unchanged)."""

    command: str = Field(
        min_length=1, description="Shell command that sets the environment up.",
        examples=["pip install -r /workspace/requirements.txt"],
    )  # fmt: skip
    timeout_minutes: Minutes = Field(
        30, description=f"Fail the setup after this long (1-{contract.MAX_TIMEOUT_MINUTES})."
    )


#: Values for settings that neither a group nor `defaults:` gives.
SETTING_DEFAULTS: dict[str, Any] = {
    "start_command": None,
    "cpu_cores": contract.DEFAULT_CPU_CORES,
    "memory_gb": contract.DEFAULT_MEMORY_GB,
    "disk_size_gb": contract.DEFAULT_DISK_SIZE_GB,
    "timeout_minutes": contract.DEFAULT_TIMEOUT_MINUTES,
    "network_access": contract.DEFAULT_NETWORK_ACCESS,
}


class SandboxSettings(_Model):
    """Settings a sandbox group may give, and `defaults:` may give for every group."""

    image: str | None = Field(
        None, min_length=1, description="Container image.", examples=["python:3.11-slim"]
    )
    from_checkpoint: str | None = Field(
        None, min_length=1, max_length=64,
        description="Start from this checkpoint's files instead of an image (one another "
        "fleet's sandbox made, e.g. with `fleetctl checkpoint SANDBOX`).",
        examples=["ckpt-3f2a9c0d1e4b5a69"],
    )  # fmt: skip
    prepare: Prepare | None = Field(
        None, description="A setup run once and checkpointed; the sandboxes start from it."
    )
    start_command: str | None = Field(
        None,
        min_length=1,
        description="Main process of the sandbox; when absent the sandbox stays idle.",
    )
    cpu_cores: float | None = Field(
        None, gt=0, le=contract.MAX_CPU_CORES,
        description=f"CPU cores (default {contract.DEFAULT_CPU_CORES:g}).",
    )  # fmt: skip
    memory_gb: float | None = Field(
        None, gt=0, le=contract.MAX_MEMORY_GB,
        description=f"Memory limit in GB (default {contract.DEFAULT_MEMORY_GB:g}).",
    )  # fmt: skip
    disk_size_gb: int | None = Field(
        None, ge=1, le=contract.MAX_DISK_SIZE_GB,
        description=f"Disk size in GB (default {contract.DEFAULT_DISK_SIZE_GB}).",
    )  # fmt: skip
    timeout_minutes: Minutes | None = Field(
        None,
        description="Lifetime: the sandbox is stopped after this long "
        f"(1-{contract.MAX_TIMEOUT_MINUTES}, default {contract.DEFAULT_TIMEOUT_MINUTES}).",
    )
    idle_timeout_minutes: Minutes | None = Field(
        None,
        description="Stop a sandbox unused this long: no exec, file transfer or command "
        "running (at most timeout_minutes; default: no idle timeout).",
    )
    network_access: bool | None = Field(
        None,
        description=f"Outbound network access (default "
        f"{str(contract.DEFAULT_NETWORK_ACCESS).lower()}); false = loopback only.",
    )
    egress: Egress | None = Field(
        None, description="Egress allow or deny list (with network access); default: every "
        "public address."
    )  # fmt: skip
    env: dict[EnvName, EnvValue] | None = Field(
        None, description="Environment variables; merged with defaults, the group wins."
    )
    secrets: dict[EnvName, SecretValue] | None = Field(
        None,
        description="Secret environment variables, from the environment or a file at apply "
        "time; merged with defaults, the group wins.",
        examples=[{"HF_TOKEN": {"from_env": "HF_TOKEN"}}],
    )
    labels: list[Label] | None = Field(
        None, description="Labels added to the sandboxes (on top of the fleet's and defaults')."
    )
    files: list[FileSpec] | None = Field(
        None, description="Files copied in; a group's list replaces the defaults' list."
    )
    expose: list[Exposure] | None = Field(
        None, description="Ports to expose; a group's list replaces the defaults' list."
    )
    jobs: list[Job] | None = Field(
        None, description="Background jobs; a group's list replaces the defaults' list."
    )


class SandboxGroup(SandboxSettings):
    """A named group of identical sandboxes."""

    name: Name = Field(
        description="Group name; with replicas, sandboxes are <name>-0, <name>-1…",
        examples=["shard"],
    )
    replicas: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description="Number of sandboxes, keyed <name>-<i>; when absent, one sandbox keyed <name>.",
    )


class FleetSpec(_Model):
    """A fleet: the sandboxes fleetctl keeps in existence, and owns."""

    api_version: Literal["fleetctl/v1"] = Field(
        alias="apiVersion", description="Always fleetctl/v1."
    )
    kind: Literal["Fleet"] = Field(description="Always Fleet.")
    name: Name = Field(description="Fleet name; every sandbox the fleet creates carries it.")
    labels: list[Label] = Field(
        default_factory=list, description="Labels added to every sandbox of the fleet."
    )
    vars: dict[str, Any] = Field(
        default_factory=dict,
        description="Template variable defaults, overridden by --var-file and --var.",
        examples=[{"shards": 4}],
    )
    defaults: SandboxSettings = Field(
        default_factory=SandboxSettings, description="Settings merged into every sandbox group."
    )
    sandboxes: list[SandboxGroup] = Field(description="The sandbox groups of the fleet.")
