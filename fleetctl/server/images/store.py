"""The image store under `<data dir>/images`: content-addressed, shared, crash-safe.

    blobs/sha256/<hex>   manifests, indexes and configs, by digest
    layers/<key>/        one unpacked layer per diff_id (key: its first 16 hex digits),
                         shared by every image that has it
    index.json           image digest → its references, config and layers; layer sizes

A layer directory appears under its key only once whole and verified (it is unpacked
beside it and renamed); a crash leaves at most a `tmp-*` directory, removed at start.
Compressed layer blobs are not kept: their unpacked directory is what runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAYERS = "layers"


def layer_key(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:")[:16]


@dataclass
class ImageRecord:
    """A stored image: the names it was pulled as, its config and its layers, bottom first."""

    digest: str
    refs: list[str]
    config: dict[str, Any]
    layers: list[str]  # store keys: diff_ids, or chain ids (see pull.store_key)
    size: int = 0  # compressed bytes, as the manifest gives them
    pulled_at: str = ""


@dataclass
class Index:
    images: dict[str, ImageRecord] = field(default_factory=dict)
    layer_sizes: dict[str, int] = field(default_factory=dict)  # diff_id → unpacked bytes


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers = root / LAYERS
        self._lock = threading.Lock()
        for directory in (root / "blobs" / "sha256", self.layers):
            directory.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)  # sandbox uids traverse it to their idmapped layers
        self.layers.chmod(0o711)
        for leftover in self.layers.glob("tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._index = self._load()

    # -- layers --------------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers / layer_key(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir()

    def scratch(self) -> Path:
        """An empty directory to unpack a layer into, beside its final place."""
        path = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.layers))
        path.chmod(0o755)
        return path

    def keep_layer(self, scratch: Path, diff_id: str, size: int) -> None:
        """Move a verified unpacked layer into place (a racing twin's copy is dropped)."""
        try:
            scratch.rename(self.layer_dir(diff_id))
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if not self.has_layer(diff_id):
                raise
        with self._lock:
            self._index.layer_sizes[diff_id] = size
            self._save()

    # -- blobs and images ----------------------------------------------------------

    def put_blob(self, digest: str, data: bytes) -> None:
        path = self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not path.exists():
            _write_atomic(path, data)

    def add_image(self, record: ImageRecord) -> None:
        with self._lock:
            for other in self._index.images.values():  # a name points at one image
                other.refs = [r for r in other.refs if r not in record.refs]
            known = self._index.images.get(record.digest)
            if known is not None:
                record.refs = sorted({*known.refs, *record.refs})
            self._index.images[record.digest] = record
            self._save()

    def find(self, name: str) -> ImageRecord | None:
        """The image stored under reference `name` (full form) or digest."""
        with self._lock:
            if name in self._index.images:
                return self._index.images[name]
            for record in self._index.images.values():
                if name in record.refs:
                    return record
        return None

    def images(self) -> list[ImageRecord]:
        with self._lock:
            return list(self._index.images.values())

    def layer_size(self, diff_id: str) -> int:
        with self._lock:
            return self._index.layer_sizes.get(diff_id, 0)

    def remove(self, name: str) -> ImageRecord | None:
        """Forget the image stored under reference or digest `name` (its layers stay until
        `prune`); the record removed, or None."""
        record = self.find(name)
        if record is None:
            return None
        with self._lock:
            self._index.images.pop(record.digest, None)
            self._save()
        return record

    def prune(self, keep_layers: set[str]) -> tuple[int, int]:
        """Remove layer directories no stored image and none of `keep_layers` (diff_ids of
        running sandboxes) uses; (layers removed, bytes freed)."""
        with self._lock:
            used = {d for r in self._index.images.values() for d in r.layers} | keep_layers
            wanted = {layer_key(d) for d in used}
            unused = [d for d in self._index.layer_sizes if layer_key(d) not in wanted]
            freed = sum(self._index.layer_sizes.pop(d) for d in unused)
            self._save()
        for directory in self.layers.iterdir():  # merged stacks (m…) may be in use: kept
            if directory.name not in wanted and not directory.name.startswith(("tmp-", "m")):
                shutil.rmtree(directory, ignore_errors=True)
        return len(unused), freed

    # -- the index file ------------------------------------------------------------

    def _load(self) -> Index:
        try:
            raw = json.loads((self.root / "index.json").read_text())
        except (OSError, ValueError):
            return Index()
        index = Index(layer_sizes=dict(raw.get("layer_sizes", {})))
        for digest, item in raw.get("images", {}).items():
            record = ImageRecord(**item)
            if all(self.has_layer(d) for d in record.layers):
                index.images[digest] = record
        return index

    def _save(self) -> None:
        data = {"images": {d: asdict(r) for d, r in self._index.images.items()},
                "layer_sizes": self._index.layer_sizes}  # fmt: skip
        _write_atomic(self.root / "index.json", json.dumps(data, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Each layer's ChainID (OCI image spec): its diff_id with every layer under it."""
    chains: list[str] = []
    for diff_id in diff_ids:
        below = f"{chains[-1]} {diff_id}".encode() if chains else b""
        chains.append("sha256:" + hashlib.sha256(below).hexdigest() if chains else diff_id)
    return chains


def store_key(store: Store, diff_id: str, chain: str) -> str | None:
    """Where the store has the layer: by its diff_id, shared by every image that has it,
    or, for a layer whose hard links were copied from the layers under it (its content
    depends on them), by its chain id. None when it is not stored."""
    for key in (diff_id, chain):
        if store.has_layer(key):
            return key
    return None
