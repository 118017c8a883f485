"""A real registry for the tests: Debian's `docker-registry` (distribution) on loopback,
with a config of its own, and images built here and pushed to it over the OCI
distribution API (no Docker).

    with local_registry(tmp) as registry:
        base = Layer().file("bin/busybox", BUSYBOX, mode=0o755).symlink("bin/sh", "busybox")
        digest = registry.push("tests/bb", "1", [base], config={"Env": ["A=1"]})
        # the server pulls 127.0.0.1:PORT/tests/bb:1 (started with --insecure-registry)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import shutil
import socket
import subprocess
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import zstandard

from tests.images.token_auth import BearerFlow, TokenService

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
BUSYBOX = Path("/bin/busybox")
#: Applets linked in the busybox base layer (what sandboxes and these tests run).
APPLETS = ("sh", "ls", "cat", "id", "env", "pwd", "echo", "test", "mkdir", "touch", "rm",
           "stat", "head", "tail", "wc", "printf", "sleep", "true", "readlink", "nohup",
           "kill", "ps", "mv", "cp", "chmod", "grep", "df", "du", "tar", "diff", "find",
           "sed")  # fmt: skip
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    """A layer's tar, entry by entry (builder methods return the layer)."""

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    compression: str = "gzip"

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> Layer:
        info.mtime = 1_700_000_000
        self.entries.append((info, data))
        return self

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0) -> Layer:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
        return self._add(info, data)

    def dir(self, name: str, mode: int = 0o755) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, mode
        return self._add(info)

    def symlink(self, name: str, target: str) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        return self._add(info)

    def hardlink(self, name: str, target: str) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.LNKTYPE, target
        return self._add(info)

    def device(self, name: str) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 1, 3, 0o666
        return self._add(info)

    def whiteout(self, name: str) -> Layer:
        parent, _, base = name.rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, directory: str) -> Layer:
        return self.file(f"{directory}/.wh..wh..opq", b"")

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in self.entries:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()

    def blob(self) -> tuple[bytes, str, str]:
        """(compressed bytes, media type, diff_id)."""
        raw = self.tar()
        if self.compression == "zstd":
            data = zstandard.ZstdCompressor().compress(raw)
            return data, "application/vnd.oci.image.layer.v1.tar+zstd", digest_of(raw)
        data = gzip.compress(raw, mtime=0)
        return data, "application/vnd.oci.image.layer.v1.tar+gzip", digest_of(raw)


def busybox_layer() -> Layer:
    """A static busybox and its applets, with /tmp, /root, /etc/passwd: runs on its own."""
    layer = Layer().dir("bin").dir("etc").dir("tmp", 0o1777).dir("root", 0o700)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    return layer.file(
        "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )


def host_binaries(*binaries: str) -> Layer:
    """The host's `binaries` at their paths, with the libraries and loader they link
    (by `ldd`), at /lib/x86_64-linux-gnu and /lib64: they run in an image of their own."""
    layer = Layer()
    for directory in ("usr", "usr/bin", "lib", "lib/x86_64-linux-gnu", "lib64"):
        layer.dir(directory)
    libraries: set[str] = set()
    for binary in binaries:
        layer.file(binary.lstrip("/"), Path(binary).read_bytes(), mode=0o755)
        listed = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
        libraries |= {part for line in listed.stdout.splitlines() for part in line.split()
                      if part.startswith("/")}  # fmt: skip
    for library in sorted(libraries):
        target = "lib64/ld-linux-x86-64.so.2" if "ld-linux" in library else (
            f"lib/x86_64-linux-gnu/{Path(library).name}")  # fmt: skip
        layer.file(target, Path(library).resolve().read_bytes(), mode=0o755)
    return layer


@dataclass
class Registry:
    url: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT
    log: Path
    auth: tuple[str, str] | httpx.Auth | None = None  # what the tests push with

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, auth=self.auth)

    def blob_gets(self) -> dict[str, int]:
        """How many times each blob was downloaded (GET), from the registry's log."""
        counts: dict[str, int] = {}
        for line in self.log.read_text().splitlines():
            if "http.request.method=GET" in line:
                found = re.search(r'http.request.uri="/v2/[^"]*/blobs/(sha256:[0-9a-f]{64})"', line)
                if found and "response completed" in line:
                    counts[found.group(1)] = counts.get(found.group(1), 0) + 1
        return counts

    def put_blob(self, repository: str, data: bytes) -> str:
        digest = digest_of(data)
        with self.client() as client:
            if client.head(f"/v2/{repository}/blobs/{digest}").status_code == 200:
                return digest
            started = client.post(f"/v2/{repository}/blobs/uploads/")
            assert started.status_code == 202, started.text
            location = started.headers["location"]
            joiner = "&" if "?" in location else "?"
            done = client.put(f"{location}{joiner}digest={digest}", content=data,
                              headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            assert done.status_code == 201, done.text
        return digest

    def put_manifest(self, repository: str, reference: str, body: dict[str, Any]) -> str:
        data = json.dumps(body).encode()
        with self.client() as client:
            response = client.put(f"/v2/{repository}/manifests/{reference}", content=data,
                                  headers={"Content-Type": body["mediaType"]})  # fmt: skip
            assert response.status_code == 201, response.text
        return digest_of(data)

    def push(
        self,
        repository: str,
        tag: str,
        layers: list[Layer],
        config: dict[str, Any] | None = None,
        arch: str = "amd64",
    ) -> str:
        """Push an image; its manifest digest."""
        descriptors, diff_ids = [], []
        for layer in layers:
            data, media_type, diff_id = layer.blob()
            digest = self.put_blob(repository, data)
            descriptors.append({"mediaType": media_type, "digest": digest, "size": len(data)})
            diff_ids.append(diff_id)
        image_config = {"architecture": arch, "os": "linux", "config": config or {},
                        "rootfs": {"type": "layers", "diff_ids": diff_ids}}  # fmt: skip
        config_data = json.dumps(image_config).encode()
        config_digest = self.put_blob(repository, config_data)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": descriptors,
                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                               "size": len(config_data)}}  # fmt: skip
        return self.put_manifest(repository, tag, manifest)

    def push_index(self, repository: str, tag: str, platforms: dict[str, str]) -> str:
        """An index over manifests already pushed: {arch: manifest digest}."""
        entries = []
        for arch, digest in platforms.items():
            with self.client() as client:
                size = len(client.get(f"/v2/{repository}/manifests/{digest}",
                                      headers={"Accept": OCI_MANIFEST}).content)  # fmt: skip
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                            "platform": {"os": "linux", "architecture": arch}})  # fmt: skip
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return self.put_manifest(repository, tag, index)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_registry(
    base: Path, user: tuple[str, str] | None = None, token: TokenService | None = None
) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 (its own config, storage under `base`), stopped by PID;
    with `user`, it asks for that user's password (htpasswd, bcrypt); with `token`, for
    tokens of that token service (Bearer)."""
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(base / "storage")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }  # fmt: skip
    if user is not None:
        with warnings.catch_warnings():  # the crypt module is deprecated; bcrypt is all we need
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # noqa: PLC0415

            hashed = crypt.crypt(user[1], crypt.mksalt(crypt.METHOD_BLOWFISH))
        (base / "htpasswd").write_text(f"{user[0]}:{hashed}\n")
        config["auth"] = {"htpasswd": {"realm": "tests", "path": str(base / "htpasswd")}}
    if token is not None:
        config["auth"] = token.registry_auth()
    (base / "registry.yml").write_text(json.dumps(config))  # JSON is YAML
    log = open(base / "registry.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([REGISTRY, "serve", str(base / "registry.yml")],
                               stdout=log, stderr=log)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (base / "registry.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v2/", timeout=2).status_code in (200, 401):
                    break
            assert time.monotonic() < deadline, "the registry did not answer within 30s"
            time.sleep(0.05)
        yield Registry(url, f"127.0.0.1:{port}", base / "registry.log",
                       BearerFlow(token.user) if token else user)  # fmt: skip
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
