"""The local server's settings, declared once: what `fleetctl server` takes on its command
line, what a background start passes on to the process it spawns, and their defaults.

Light on purpose (no FastAPI, no uvicorn): the CLI declares its options from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7431
ImagePolicy = Literal["pull-or-host", "pull", "host"]
IMAGE_POLICIES: tuple[ImagePolicy, ...] = ("pull-or-host", "pull", "host")
#: Unpacked bytes one image may take (a decompression bomb stops there).
DEFAULT_IMAGE_MAX_GB = 20.0


def default_image_policy() -> ImagePolicy:
    """FLEETCTL_IMAGE_POLICY if it names a policy, else pull-or-host."""
    wanted = os.environ.get("FLEETCTL_IMAGE_POLICY", "")
    return next((p for p in IMAGE_POLICIES if p == wanted), "pull-or-host")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """How to run a server. `rate_limit` and `faults` are the flag values, parsed at start."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path | None = None
    image_policy: ImagePolicy = field(default_factory=default_image_policy)
    rate_limit: str = ""
    faults: str = ""
    timeout_scale: float = 1.0
    #: Files holding further API keys the server accepts (the data dir's token is the first).
    api_key_files: tuple[Path, ...] = ()
    #: Offer the gateway's Connect command session (off: exec over REST only, as 0.2 APIs).
    command_session: bool = True
    #: Registries (host:port) spoken to over plain HTTP.
    insecure_registries: tuple[str, ...] = ()
    #: Docker Hub mirrors (URLs), tried in order before Docker Hub.
    registry_mirrors: tuple[str, ...] = ()
    image_max_gb: float = DEFAULT_IMAGE_MAX_GB
    #: Sandboxes with network access share the server's network namespace (insecure).
    insecure_host_network: bool = False
    #: The resolvers sandboxes are given (empty: the host's, but for loopback ones).
    sandbox_dns: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return self.data_dir or default_data_dir()

    def argv(self) -> list[str]:
        """The `fleetctl server` arguments that run a server with these options."""
        args = ["--host", self.host, "--port", str(self.port), "--data-dir", str(self.directory),
                "--image-policy", self.image_policy]  # fmt: skip
        if self.rate_limit:
            args += ["--rate-limit", self.rate_limit]
        if self.faults:
            args += ["--faults", self.faults]
        if self.timeout_scale != 1.0:
            args += ["--timeout-scale", str(self.timeout_scale)]
        for path in self.api_key_files:
            args += ["--api-key-file", str(path)]
        if not self.command_session:
            args += ["--no-command-session"]
        for host in self.insecure_registries:
            args += ["--insecure-registry", host]
        for mirror in self.registry_mirrors:
            args += ["--registry-mirror", mirror]
        if self.image_max_gb != DEFAULT_IMAGE_MAX_GB:
            args += ["--image-max-gb", str(self.image_max_gb)]
        if self.insecure_host_network:
            args += ["--insecure-host-network"]
        for resolver in self.sandbox_dns:
            args += ["--sandbox-dns", resolver]
        return args


def default_data_dir() -> Path:
    """FLEETCTL_DATA_DIR, else /var/lib/fleetctl for root, else ~/.local/share/fleetctl.

    Root's default is outside /root on purpose: sandbox uids must traverse it.
    """
    if "FLEETCTL_DATA_DIR" in os.environ:
        return Path(os.environ["FLEETCTL_DATA_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/fleetctl")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fleetctl"


def restart_marker(data_dir: Path) -> Path:
    """While this file exists, a server that stops leaves its sandboxes running for the
    next one to adopt (`fleetctl server restart`)."""
    return data_dir / "restarting"
