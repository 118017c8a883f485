"""A Debian image built from this Debian host's own installed packages, with no download:
apt, dpkg, the shadow tools and everything they depend on, with their dpkg database
entries, so `apt-get install` and `useradd` inside work as in `debian:bookworm`.

    layer = debian_layer()   # one layer, root-owned as in any Debian image
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.images.registry import Layer

#: What the image has installed (with their dependencies, read from the host's dpkg;
#: essential packages are named, as nothing declares a dependency on them).
PACKAGES = ("apt", "base-files", "base-passwd", "bash", "coreutils", "dash", "debconf",
            "debianutils", "diffutils", "dpkg", "findutils", "grep", "gzip", "libc-bin",
            "login", "mawk", "passwd", "perl-base", "sed", "tar")  # fmt: skip
#: Left out to keep the image small (what slim images drop too).
SKIPPED = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/",
           "usr/share/lintian/", "usr/share/bug/")  # fmt: skip
#: Accounts of a stock Debian image (apt drops to _apt to fetch).
PASSWD = (b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          b"_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")  # fmt: skip
GROUP = (b"root:x:0:\ndaemon:x:1:\nadm:x:4:\ntty:x:5:\nshadow:x:42:\nstaff:x:50:\n"
         b"users:x:100:\nnogroup:x:65534:\n")  # fmt: skip
EMPTY_DIRS = ("tmp", "root", "home", "var/lib/apt/lists/partial",
              "var/cache/apt/archives/partial", "var/log/apt", "var/lib/dpkg/updates",
              "var/lib/dpkg/triggers", "etc/apt/preferences.d")  # fmt: skip


def debian_layer() -> Layer:
    packages = _closure(PACKAGES)
    layer = Layer(compression="zstd")
    for link in ("bin", "sbin", "lib", "lib64"):  # merged /usr, as on the host
        if Path("/", link).is_symlink():
            layer.symlink(link, os.readlink(Path("/", link)))
    added: set[str] = set()
    for path in sorted(_files(packages)):
        _add_host(layer, path, added)
    for directory in EMPTY_DIRS:
        _add_dirs(layer, directory, added)
    for name, data in _dpkg_database(packages).items():
        layer.file(name, data)
    layer.file("etc/passwd", PASSWD).file("etc/group", GROUP)
    layer.file("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640)
    layer.file("etc/ld.so.cache", Path("/etc/ld.so.cache").read_bytes())
    return layer


def _closure(wanted: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        shown = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Depends},${Pre-Depends}",
                                name], capture_output=True, text=True, check=False)  # fmt: skip
        status, _, depends = shown.stdout.partition("|")
        if not status.endswith(" installed"):
            continue  # a virtual package's provider is listed first in the alternatives
        found.add(name)
        for item in depends.split(","):
            if item.strip():
                todo.append(item.split("|")[0].split()[0].split(":")[0])
    return found


def _files(packages: set[str]) -> set[str]:
    listed = subprocess.run(["dpkg", "-L", *sorted(packages)], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    paths = set()
    for line in listed.splitlines():
        if not line.startswith("/") or line == "/." or line.startswith("/etc/ld.so.cache"):
            continue
        real = Path(os.path.realpath(Path(line).parent)) / Path(line).name
        relative = str(real).lstrip("/")
        if (real.exists() or real.is_symlink()) and not relative.startswith(SKIPPED):
            paths.add(relative)
    return paths


def _add_dirs(layer: Layer, directory: str, added: set[str]) -> None:
    parts = Path(directory).parts
    for depth in range(1, len(parts) + 1):
        name = "/".join(parts[:depth])
        if name not in added:
            added.add(name)
            layer.dir(name, 0o1777 if name == "tmp" else 0o700 if name == "root" else 0o755)


def _add_host(layer: Layer, relative: str, added: set[str]) -> None:
    if "/" in relative:
        _add_dirs(layer, str(Path(relative).parent), added)
    if relative in added:
        return
    added.add(relative)
    host = Path("/", relative)
    info = host.lstat()
    if stat.S_ISDIR(info.st_mode):
        layer.dir(relative, stat.S_IMODE(info.st_mode))
    elif stat.S_ISLNK(info.st_mode):
        layer.symlink(relative, os.readlink(host))
    elif stat.S_ISREG(info.st_mode):
        layer.file(relative, host.read_bytes(), mode=stat.S_IMODE(info.st_mode))


def _dpkg_database(packages: set[str]) -> dict[str, bytes]:
    """var/lib/dpkg: status entries and file lists of `packages` only."""
    status = Path("/var/lib/dpkg/status").read_text()
    kept = [entry for entry in status.split("\n\n")
            if entry.startswith("Package: ") and entry.split("\n")[0][9:] in packages]  # fmt: skip
    files = {"var/lib/dpkg/status": ("\n\n".join(kept) + "\n").encode(),
             "var/lib/dpkg/available": b""}  # fmt: skip
    for info in Path("/var/lib/dpkg/info").iterdir():
        if info.name.split(".")[0].split(":")[0] in packages and info.is_file():
            files[f"var/lib/dpkg/info/{info.name}"] = info.read_bytes()
    return files
