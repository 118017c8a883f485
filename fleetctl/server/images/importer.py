"""Images loaded from an archive instead of a registry (air-gapped hosts):

    an OCI image layout      oci-layout, index.json, blobs/sha256/<hex>
                             (`skopeo copy … oci:DIR`, and `docker save` of Docker 25+)
    a `docker save` tarball  manifest.json ([{Config, RepoTags, Layers}]) and the files
                             it names

sent as one tar (the CLI tars a layout directory on the fly). The archive is unpacked
into a scratch directory of the store with `tarfile`'s data filter (no links out, no
devices), then each image goes in like a pulled one: its layers unpacked and checked
against the config's diff_ids, its names from RepoTags or the
`org.opencontainers.image.ref.name` annotation (normalised like any reference).
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetctl.server.images.reference import BadReference, parse
from fleetctl.server.images.registry import INDEX_TYPES, PullError, sha256
from fleetctl.server.images.store import ImageRecord, Store, chain_ids, store_key
from fleetctl.server.images.unpack import unpack

REF_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


def import_archive(archive: Path, store: Store, max_unpacked: int) -> list[ImageRecord]:
    """Store every image of the tar `archive`; the records stored. PullError says why not."""
    scratch = Path(tempfile.mkdtemp(prefix="tmp-import-", dir=store.layers))
    try:
        try:
            with tarfile.open(archive, "r:") as tar:  # uncompressed: its size bounds its files
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise PullError(f"the archive cannot be read as a tar: {exc}") from None
        if (scratch / "index.json").is_file():
            found = list(_oci_images(scratch))
        elif (scratch / "manifest.json").is_file():
            found = list(_docker_images(scratch))
        else:
            raise PullError("the archive is neither an OCI image layout (index.json) nor a "
                            "`docker save` tarball (manifest.json)")  # fmt: skip
        if not found:
            raise PullError("the archive holds no image")
        return [_store_image(scratch, store, max_unpacked, *image) for image in found]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


Found = tuple[str, dict[str, Any], list[Path], list[str], int]  # digest, config, layers, names


def _oci_images(root: Path) -> Iterator[Found]:
    index = _json(root / "index.json")
    for entry in index.get("manifests") or []:
        names = [str(v) for k, v in (entry.get("annotations") or {}).items()
                 if k in REF_ANNOTATIONS]  # fmt: skip
        manifest_path = _blob(root, entry.get("digest"))
        manifest = _json(manifest_path)
        if entry.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            raise PullError("nested indexes in an image layout are not imported; export one "
                            "platform (e.g. skopeo copy --override-arch)")  # fmt: skip
        config = _json(_blob(root, (manifest.get("config") or {}).get("digest")))
        layers = [_blob(root, layer.get("digest")) for layer in manifest.get("layers") or []]
        size = sum(int(layer.get("size", 0)) for layer in manifest.get("layers") or [])
        digest = sha256(manifest_path.read_bytes())
        yield digest, config, layers, names, size


def _docker_images(root: Path) -> Iterator[Found]:
    for entry in _json_list(root / "manifest.json"):
        config_path = _inside(root, str(entry.get("Config", "")))
        config_data = config_path.read_bytes()
        layers = [_inside(root, str(name)) for name in entry.get("Layers") or []]
        size = sum(p.stat().st_size for p in layers)
        names = [str(tag) for tag in entry.get("RepoTags") or []]
        yield sha256(config_data), _json(config_path), layers, names, size


def _store_image(
    root: Path, store: Store, max_unpacked: int, digest: str, config: dict[str, Any],
    layers: list[Path], names: list[str], size: int,
) -> ImageRecord:  # fmt: skip
    diff_ids = [str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
    if len(diff_ids) != len(layers):
        raise PullError(f"image {digest}: its config lists {len(diff_ids)} layers and its "
                        f"manifest {len(layers)}")  # fmt: skip
    keys: list[str] = []
    for path, diff_id, chain in zip(layers, diff_ids, chain_ids(diff_ids), strict=True):
        stored = store_key(store, diff_id, chain)
        if stored is not None:
            keys.append(stored)
            continue
        below = [store.layer_dir(key) for key in keys]
        copied: list[bool] = []

        def layers_below(below: list[Path] = below, copied: list[bool] = copied) -> list[Path]:
            copied.append(True)
            return below

        scratch = store.scratch()
        try:
            with path.open("rb") as data:
                head = data.read(4)
                data.seek(0)
                compression = _MAGIC.get(head[:2]) or _MAGIC.get(head) or "none"
                actual = unpack(iter(lambda: data.read(1 << 20), b""), compression, scratch,
                                max_unpacked, layers_below)  # fmt: skip
            if actual != diff_id:
                raise PullError(f"image {digest}: a layer unpacks to {actual}, not the diff_id "
                                f"{diff_id} its config gives")  # fmt: skip
            keys.append(chain if copied else diff_id)
            store.keep_layer(scratch, keys[-1], sum(p.lstat().st_size for p in scratch.rglob("*")))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    refs = []
    for name in names:
        try:
            refs.append(str(parse(name)))
        except BadReference:
            continue
    record = ImageRecord(digest=digest, refs=sorted(set(refs)), config=config,
                         layers=keys, size=size,
                         pulled_at=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
    store.add_image(record)
    return record


def _blob(root: Path, digest: object) -> Path:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise PullError(f"the layout names a blob by {digest!r:.80}, not a sha256 digest")
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if not path.is_file():
        raise PullError(f"the layout lacks blob {digest}")
    if sha256(path.read_bytes()) != digest:
        raise PullError(f"blob {digest} of the layout does not match its digest")
    return path


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise PullError(f"manifest.json names {name!r}, which is not a file of the archive")
    return path


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PullError(f"{path.name} of the archive is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PullError(f"{path.name} of the archive is not a JSON object")
    return value


def _json_list(path: Path) -> list[dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PullError(f"{path.name} of the archive is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PullError(f"{path.name} of the archive is not a list of images")
    return value
