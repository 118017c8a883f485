"""A layer's tar stream written out as a directory overlayfs can stack.

The stream is read once, as it arrives (`tarfile` in stream mode over the decompressed
bytes), and hashed: its sha256 is the layer's diff_id, checked by the caller. What each
entry becomes:

    regular file, directory, symlink   itself, with its mode, owner and mtime
    hard link                          a link to an earlier entry of the same layer, or
                                       a copy of the file a lower layer has (refused
                                       when neither has it)
    .wh.NAME                           a whiteout: a 0/0 character device at NAME
    .wh..wh..opq in DIR                DIR opaque: xattr user.overlay.opaque=y
    device node, FIFO                  skipped (a sandbox may not make devices either)

Those are the forms overlayfs reads when mounted in a user namespace (bwrap mounts
with `userxattr`). Path safety: a name with `..`, an absolute name, or one whose parent
is a symlink (in this layer) is refused, so nothing is written outside the directory;
every write goes through file descriptors opened without following symlinks. The
total size written is bounded (`limit`): a decompression bomb stops there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

import zstandard

from fleetctl.server.images.registry import PullError

_Decompress = Callable[[bytes, bool], bytes]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "user.overlay.opaque"


class UnpackError(PullError):
    """The layer cannot be unpacked safely; the message names the entry and why."""


class _Reader(io.RawIOBase):
    """Decompressed bytes of a compressed chunk stream, hashed as they are read."""

    def __init__(self, chunks: Iterable[bytes], compression: str) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buffer = b""
        self.hash = hashlib.sha256()
        self._decompress = _decompressor(compression)

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._buffer = self._decompress(b"", True)
                if not self._buffer:
                    return 0
                break
            self._buffer = self._decompress(chunk, False)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self.hash.update(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return size

    def drain(self) -> None:
        """Read what tar left after its end-of-archive blocks (it counts in the diff_id)."""
        while self.read(1 << 20):
            pass


def _decompressor(compression: str) -> _Decompress:
    if compression == "gzip":
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

        def gunzip(data: bytes, final: bool) -> bytes:
            try:
                return inflate.flush() if final else inflate.decompress(data)
            except zlib.error as exc:
                raise UnpackError(f"the layer is not valid gzip: {exc}") from None

        return gunzip
    if compression == "zstd":
        stream = zstandard.ZstdDecompressor().decompressobj()

        def unzstd(data: bytes, final: bool) -> bytes:
            try:
                return b"" if final else stream.decompress(data)
            except zstandard.ZstdError as exc:
                raise UnpackError(f"the layer is not valid zstd: {exc}") from None

        return unzstd
    return lambda data, final: data


def unpack(
    chunks: Iterable[bytes],
    compression: str,
    target: Path,
    limit: int,
    below: Callable[[], Sequence[Path]] = tuple,
) -> str:
    """Write the layer into `target` (an empty directory); its diff_id (sha256 of the tar).
    `below()` gives the image's layers under this one (bottom first, waiting for them if
    need be), asked only for hard links to their files.

    UnpackError names what was refused; the caller removes `target` then."""
    reader = _Reader(chunks, compression)
    written = 0
    links: set[str] = set()
    symlinks: set[str] = set()
    deferred: dict[str, str] = {}
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as archive:
            for entry in archive:
                written += max(entry.size, 0) if entry.isfile() else 0
                if written > limit:
                    raise UnpackError(f"the layer unpacks to more than {limit} bytes")
                deferred.pop(str(safe_name(entry.name)), None)  # replaced
                _extract(archive, entry, root, links, symlinks, deferred)
        reader.drain()
        if deferred:
            _copy_from_below(root, deferred, below(), limit - written)
    except tarfile.TarError as exc:
        raise UnpackError(f"the layer is not a whole tar archive: {exc}") from None
    finally:
        os.close(root)
    return "sha256:" + reader.hash.hexdigest()


def _copy_from_below(
    root: int, deferred: dict[str, str], below: Sequence[Path], budget: int
) -> None:
    """Hard links to files of lower layers, written as copies (a link cannot cross
    layers), read without following a symlink; their bytes count against the layer's
    limit (`budget` is what is left of it)."""
    for name, source in deferred.items():
        found = find(below, PurePosixPath(source))
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            source_fd = os.open(found, flags) if found is not None else -1
        except OSError:
            source_fd = -1
        if source_fd < 0 or not stat.S_ISREG(os.fstat(source_fd).st_mode):
            if source_fd >= 0:
                os.close(source_fd)
            raise UnpackError(f"layer entry {name!r}: a hard link to {source!r}, which is in "
                              "neither this layer nor a layer below as a file")  # fmt: skip
        path = PurePosixPath(name)
        with os.fdopen(source_fd, "rb") as data, _parent_dir(root, path) as parent_fd:
            info = os.fstat(data.fileno())
            budget -= info.st_size
            if budget < 0:
                raise UnpackError("the layer unpacks to more than its limit with the files "
                                  "its hard links copy from the layers below")  # fmt: skip
            entry = tarfile.TarInfo(name)
            entry.uid, entry.gid, entry.mode, entry.mtime = (
                info.st_uid, info.st_gid, info.st_mode, int(info.st_mtime)
            )  # fmt: skip
            _remove(parent_fd, path.name)
            _write_from(data, entry, parent_fd, path.name)


def safe_name(name: str) -> PurePosixPath:
    """The entry's path relative to the layer root; UnpackError if it leaves it."""
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise UnpackError(f"layer entry {name!r}: absolute names are refused")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts:
        raise UnpackError(f"layer entry {name!r}: names with '..' are refused")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _extract(
    archive: tarfile.TarFile,
    entry: tarfile.TarInfo,
    root: int,
    links: set[str],
    symlinks: set[str],
    deferred: dict[str, str],
) -> None:
    path = safe_name(entry.name)
    if str(path) == ".":
        return
    for parent in list(reversed(path.parents))[1:]:
        if str(parent) in symlinks:
            raise UnpackError(f"layer entry {entry.name!r} goes through the symlink {parent}")
    name = path.name
    with _parent_dir(root, path) as parent_fd:
        if name == OPAQUE:
            os.setxattr(parent_fd, OPAQUE_XATTR, b"y")
            return
        if name.startswith(WHITEOUT):
            hidden = name[len(WHITEOUT) :]
            if not hidden or "/" in hidden:
                raise UnpackError(f"layer entry {entry.name!r}: a whiteout of nothing")
            deferred.pop(str(path.parent / hidden), None)
            _remove(parent_fd, hidden)
            os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent_fd)
            return
        if entry.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            if stat.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode):
                raise UnpackError(f"layer entry {entry.name!r}: a directory over a symlink")
            _finish(parent_fd, name, entry)
            return
        _remove(parent_fd, name)
        if entry.issym():
            os.symlink(entry.linkname, name, dir_fd=parent_fd)
            symlinks.add(str(path))
            os.chown(name, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False)
        elif entry.islnk():
            source = str(safe_name(entry.linkname))
            if source not in links:  # in a lower layer: copied once the layer is read
                deferred[str(path)] = deferred.get(source, source)
                return
            with _parent_dir(root, PurePosixPath(source)) as source_fd:
                os.link(PurePosixPath(source).name, name, src_dir_fd=source_fd,
                        dst_dir_fd=parent_fd, follow_symlinks=False)  # fmt: skip
            links.add(str(path))
        elif entry.isfile():
            _write(archive, entry, parent_fd, name)
            links.add(str(path))
        # device nodes and FIFOs: skipped


def find(layers: Sequence[Path], path: PurePosixPath) -> Path | None:
    """Where the stack `layers` (bottom first) has the relative `path`: in the topmost layer
    that has it, unless a whiteout, an opaque directory or a file above hides it. None
    when it is hidden, absent, or behind a symlink (never followed)."""
    for layer in reversed(layers):
        here, hidden = layer, False
        for index, part in enumerate(path.parts):
            here = here / part
            try:
                info = here.lstat()
            except FileNotFoundError:
                if hidden:
                    return None
                break  # not in this layer: look below
            if is_whiteout(info):
                return None
            if index == len(path.parts) - 1:
                return here
            if not stat.S_ISDIR(info.st_mode):  # a file or symlink where a directory was
                return None
            hidden = hidden or is_opaque(here)
    return None


def is_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def is_opaque(directory: Path) -> bool:
    try:
        return os.getxattr(directory, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _write(archive: tarfile.TarFile, entry: tarfile.TarInfo, parent_fd: int, name: str) -> None:
    source = archive.extractfile(entry)
    assert source is not None
    _write_from(source, entry, parent_fd, name)


def _write_from(source: IO[bytes], entry: tarfile.TarInfo, parent_fd: int, name: str) -> None:
    """A new file `name` in `parent_fd` with `source`'s bytes and `entry`'s owner, mode and
    mtime."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=parent_fd)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode & 0o7777)
        os.utime(fd, (entry.mtime, entry.mtime))
    finally:
        os.close(fd)


def _finish(parent_fd: int, name: str, entry: tarfile.TarInfo) -> None:
    os.chown(name, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False)
    os.chmod(name, entry.mode & 0o7777, dir_fd=parent_fd, follow_symlinks=False)


def _remove(parent_fd: int, name: str) -> None:
    """Make room for an entry that replaces an earlier one of the same layer."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode):
            raise UnpackError(f"layer entry {name!r} replaces a directory of the same layer")
        os.unlink(name, dir_fd=parent_fd)


@contextlib.contextmanager
def _parent_dir(root: int, path: PurePosixPath) -> Iterator[int]:
    """An fd of `path`'s parent, walked from `root` one component at a time, never
    through a symlink; missing directories are made (root-owned, 0755)."""
    fd = os.dup(root)
    try:
        for part in path.parent.parts:
            if part == ".":
                continue
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise UnpackError(f"layer entry path {path}: {part!r} is not a directory "
                                  f"({exc.strerror})") from None  # fmt: skip
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)
