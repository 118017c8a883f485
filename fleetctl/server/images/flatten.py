"""Merging an image's bottom layers into one directory, for images with more layers than
one overlay mount can stack (every lower dir's path goes into one mount option, which
fits in a 4 KiB page).

    key = flatten(store, layer_dirs)   # a directory of the store, made once per stack

The merge applies each layer over the ones below as overlayfs would read them: a
whiteout (a 0/0 character device) removes what it names, an opaque directory drops what
lay under it, anything else replaces what was there. Files are hard links to the layers'
own (the store's layers are never written), so a merge costs directory entries, not
data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from fleetctl.server.images.store import Store
from fleetctl.server.images.unpack import is_opaque, is_whiteout

PREFIX = "m"  # not a hex digit: never a layer's key


def flatten(store: Store, layers: list[Path]) -> str:
    """The name of the store directory holding `layers` (bottom first) merged; made once."""
    digest = hashlib.sha256("\n".join(p.name for p in layers).encode()).hexdigest()
    key = PREFIX + digest[: 16 - len(PREFIX)]
    target = store.layers / key
    if target.is_dir():
        return key
    scratch = store.scratch()
    try:
        for layer in layers:
            _apply(layer, scratch)
        try:
            scratch.rename(target)
        except OSError:  # made meanwhile by a twin
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return key


def _apply(layer: Path, merged: Path) -> None:
    for top, dirs, files in os.walk(layer):
        here = merged / Path(top).relative_to(layer)
        for name in [*dirs, *files]:
            source, target = Path(top) / name, here / name
            info = source.lstat()
            if stat.S_ISDIR(info.st_mode):
                replaced = target.is_symlink() or (target.exists() and not target.is_dir())
                if replaced or is_opaque(source):
                    _remove(target)
                if not target.is_dir():
                    target.mkdir()
                os.chown(target, info.st_uid, info.st_gid)
                os.chmod(target, stat.S_IMODE(info.st_mode))
                continue
            _remove(target)
            if is_whiteout(info):
                continue  # what it names is gone
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(source), target)
                os.lchown(target, info.st_uid, info.st_gid)
            else:
                os.link(source, target, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
