"""Pulling an image into the store: once per image and once per layer, however many
creates ask at the same moment.

    puller = Puller(store, registry, max_unpacked=…)
    image = puller.pull("python:3.11-slim")   # blocking; run it in a worker thread

A tag resolves to a manifest (an index resolves to its linux/<host arch> manifest), the
manifest's config gives the layers' diff_ids, and each missing layer is downloaded,
hashed, decompressed and unpacked in one pass, several layers at once. A layer counts
only when its blob matched its digest and its tar stream its diff_id.
"""

from __future__ import annotations

import json
import platform
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetctl.server.images.reference import Reference, parse
from fleetctl.server.images.registry import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    PullError,
    Registry,
    Unreachable,
)
from fleetctl.server.images.store import ImageRecord, Store, chain_ids, store_key
from fleetctl.server.images.unpack import unpack

PARALLEL_LAYERS = 4
#: How long a registry no connection reached is not asked again (its stored images serve).
UNREACHABLE_S = 60.0
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_COMPRESSION = {"gzip": "gzip", "zstd": "zstd", "tar": "none"}


@dataclass(frozen=True)
class Image:
    """A pulled image, ready to run: its digest, layer directories (bottom first), config."""

    ref: str
    digest: str
    layers: tuple[Path, ...]
    config: dict[str, Any]


class PullInProgress(Exception):
    """A pull is under way: its layers are not referenced yet, so nothing is pruned."""


class Puller:
    def __init__(self, store: Store, registry: Registry, *, max_unpacked: int) -> None:
        self.store, self.registry, self.max_unpacked = store, registry, max_unpacked
        self._lock = threading.Lock()
        self._images: dict[str, Future[Image]] = {}
        self._layers: dict[str, Future[str]] = {}
        self._pool = ThreadPoolExecutor(PARALLEL_LAYERS, thread_name_prefix="layer")
        self._unreachable: dict[str, float] = {}  # registry → monotonic time to ask again
        self._unreachable_why: dict[str, str] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.registry.close()

    def image(self, name: str) -> Image:
        """The stored image `name`, else pulled (as Docker's and Kubernetes' default policy:
        a stored tag is not resolved again; `pull` does that)."""
        stored = self.store.find(str(parse(name)))
        return self._image(stored) if stored is not None else self.pull(name)

    def resolve(self, name: str) -> str:
        """The digest of the manifest `name` names now for this platform (no layers)."""
        ref = parse(name)
        manifest = self.registry.manifest(ref, ref.version)
        if manifest.media_type in INDEX_TYPES or "manifests" in manifest.json():
            return _platform_manifest(ref, manifest.json())
        return manifest.digest

    def pull(self, name: str) -> Image:
        """The image `name` from its registry (a tag resolved again), pulled into the store."""
        ref = parse(name)
        future, mine = self._claim(self._images, str(ref))
        if not mine:
            waited: Image = future.result()
            return waited
        try:
            image = self._reachable_pull(ref)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(image)
            return image
        finally:
            with self._lock:
                self._images.pop(str(ref), None)

    def prune(self, keep_layers: set[str]) -> tuple[int, int]:
        """Remove unused layers (see `Store.prune`); PullInProgress while a pull runs."""
        with self._lock:
            if self._images or self._layers:
                raise PullInProgress("an image is being pulled; prune again once it is done")
            return self.store.prune(keep_layers)

    # -- the pull itself -----------------------------------------------------------

    def _reachable_pull(self, ref: Reference) -> Image:
        """Pull; when no registry answers, the stored image of that name if there is one.
        A registry found unreachable is not asked again for UNREACHABLE_S."""
        stored = self.store.find(str(ref))
        quiet_until = self._unreachable.get(ref.registry, 0.0)
        try:
            if time.monotonic() < quiet_until:
                raise Unreachable(self._unreachable_why[ref.registry])
            return self._pull(ref)
        except Unreachable as exc:
            if ref.registry not in self._unreachable or time.monotonic() >= quiet_until:
                self._unreachable[ref.registry] = time.monotonic() + UNREACHABLE_S
                self._unreachable_why[ref.registry] = str(exc)
            if stored is not None:
                return self._image(stored)
            raise

    def _pull(self, ref: Reference) -> Image:
        manifest = self.registry.manifest(ref, ref.version)
        if manifest.media_type in INDEX_TYPES or "manifests" in manifest.json():
            digest = _platform_manifest(ref, manifest.json())
            self.store.put_blob(manifest.digest, manifest.data)
            manifest = self.registry.manifest(ref, digest)
        body = manifest.json()
        if manifest.media_type not in MANIFEST_TYPES and "layers" not in body:
            raise PullError(f"{ref}: unsupported manifest type {manifest.media_type!r}")
        known = self.store.find(manifest.digest)
        if known is not None:
            self._record(ref, known)
            return self._image(known)
        config_desc = _descriptor(ref, body.get("config"))
        config_data = self.registry.small_blob(ref, config_desc["digest"], config_desc["size"])
        config = _json(ref, config_data, "config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layers = [_descriptor(ref, layer) for layer in body.get("layers") or []]
        if len(diff_ids) != len(layers):
            raise PullError(f"{ref}: its config lists {len(diff_ids)} layers and its manifest "
                            f"{len(layers)}")  # fmt: skip
        pending: list[Future[str]] = []
        for layer, diff_id, chain in zip(layers, diff_ids, chain_ids(diff_ids), strict=True):
            pending.append(self._layer(ref, layer, diff_id, chain, list(pending)))
        keys = [job.result() for job in pending]
        self.store.put_blob(config_desc["digest"], config_data)
        self.store.put_blob(manifest.digest, manifest.data)
        record = ImageRecord(
            digest=manifest.digest, refs=[str(ref)], config=config, layers=keys,
            size=sum(layer["size"] for layer in layers),
            pulled_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )  # fmt: skip
        self._record(ref, record)
        return self._image(record)

    def _record(self, ref: Reference, record: ImageRecord) -> None:
        names = {str(ref), *record.refs}
        if ref.digest is None:
            names.add(str(ref.pinned(record.digest)).replace(f":{ref.tag}@", "@"))
        record.refs = sorted(names)
        self.store.add_image(record)

    def _image(self, record: ImageRecord) -> Image:
        layers = tuple(self.store.layer_dir(d) for d in record.layers)
        return Image(record.refs[0] if record.refs else record.digest, record.digest, layers,
                     record.config)  # fmt: skip

    def _layer(
        self,
        ref: Reference,
        layer: dict[str, Any],
        diff_id: str,
        chain: str,
        below: list[Future[str]],
    ) -> Future[str]:
        """The layer's store key once it is stored (unpacked now, joined, or found); `below`:
        the image's layers under it, queued before it, so none of them waits for it."""
        stored = store_key(self.store, diff_id, chain)
        if stored is not None:
            done: Future[str] = Future()
            done.set_result(stored)
            return done
        with self._lock:  # claimed and queued at once: what it waits for is queued first
            if chain in self._layers:
                return self._layers[chain]
            future: Future[str] = Future()
            self._layers[chain] = future
            self._pool.submit(self._fetch_layer, ref, layer, (diff_id, chain), future, below)
        return future

    def _fetch_layer(
        self,
        ref: Reference,
        layer: dict[str, Any],
        ids: tuple[str, str],
        future: Future[str],
        below: list[Future[str]],
    ) -> None:
        diff_id, chain = ids
        copied: list[bool] = []

        def layers_below() -> list[Path]:
            copied.append(True)
            return [self.store.layer_dir(job.result()) for job in below]

        scratch = self.store.scratch()
        try:
            compression = _compression(ref, layer["mediaType"])
            with self.registry.blob(ref, layer["digest"], layer["size"]) as stream:
                actual = unpack(stream, compression, scratch, self.max_unpacked, layers_below)
                stream.verify()
            if actual != diff_id:
                raise PullError(f"{ref}: layer {layer['digest']} unpacks to {actual}, not the "
                                f"diff_id {diff_id} its config gives")  # fmt: skip
            key = chain if copied else diff_id
            self.store.keep_layer(scratch, key, _tree_size(scratch))
            future.set_result(key)
        except BaseException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            future.set_exception(exc)
        finally:
            with self._lock:
                self._layers.pop(chain, None)

    def _claim(self, table: dict[str, Future[Any]], key: str) -> tuple[Future[Any], bool]:
        with self._lock:
            if key in table:
                return table[key], False
            future: Future[Any] = Future()
            table[key] = future
            return future, True


def host_arch() -> str:
    return _ARCH.get(platform.machine().lower(), platform.machine().lower())


def _platform_manifest(ref: Reference, index: dict[str, Any]) -> str:
    arch = host_arch()
    for entry in index.get("manifests") or []:
        wanted = entry.get("platform") or {}
        if wanted.get("os") == "linux" and wanted.get("architecture") == arch:
            return str(_descriptor(ref, entry)["digest"])
    offered = sorted(
        f"{(e.get('platform') or {}).get('os')}/{(e.get('platform') or {}).get('architecture')}"
        for e in index.get("manifests") or []
    )
    raise PullError(f"{ref}: no linux/{arch} image in its index (it has {', '.join(offered)})")


def _descriptor(ref: Reference, value: Any) -> dict[str, Any]:
    if (not isinstance(value, dict) or not isinstance(value.get("digest"), str)
            or not isinstance(value.get("size"), int) or value["size"] < 0):  # fmt: skip
        raise PullError(f"{ref}: a descriptor without a digest and size: {value!r:.200}")
    if not value["digest"].startswith("sha256:") or len(value["digest"]) != 71:
        raise PullError(f"{ref}: unsupported digest {value['digest']!r:.100} (sha256 only)")
    return value


def _compression(ref: Reference, media_type: str) -> str:
    suffix = media_type.rsplit(".", 1)[-1].rsplit("+", 1)[-1]
    if "nondistributable" in media_type or "foreign" in media_type:
        raise PullError(f"{ref}: foreign layers ({media_type}) are not pulled")
    if suffix not in _COMPRESSION:
        raise PullError(f"{ref}: unsupported layer type {media_type!r}")
    return _COMPRESSION[suffix]


def _json(ref: Reference, data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise PullError(f"{ref}: its {what} is not a JSON object")
    return value


def _tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*"))


__all__ = ["Image", "PullError", "Puller", "Unreachable"]
