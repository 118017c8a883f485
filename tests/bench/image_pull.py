"""Benchmark: pulling and running images (not run by the test suite).

    python tests/bench/image_pull.py [--mb 50] [--creates 30]

Builds a multi-layer image of about `mb` MB (a static busybox, then four layers of
random, incompressible files) and pushes it to Debian's docker-registry on loopback
(`tests/images/registry.py`), then measures, in one run:

    pull      the server's pull + unpack into an empty store (POST
              /api/v1/_fleetctl/images/pull), against `skopeo copy` to an OCI layout +
              `umoci raw unpack --rootless` of the same image (the reference tools;
              Debian's skopeo and umoci), each timed cold, three times alternating,
              best of each
    create    create → RUNNING p50 of sandboxes from the stored image and from the
              host's root filesystem (an image whose registry cannot be reached, under
              --image-policy pull-or-host), `creates` of each, alternating
    disk      a second image sharing the first's base layers: what it adds to the store,
              against the size of its own layer

Prints figures and, last, one line:

    pull_s=… reference_s=… pull_ratio=… create_image_p50_ms=… create_host_p50_ms=…
    create_ratio=… second_image_added_mb=… second_image_own_mb=…

Targets: pull_ratio ≤ 1.0, create_ratio ≤ 1.3, second_image_added_mb ≈ its own layer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx

from tests.conftest import Server, start_server, stop_server
from tests.images.registry import Layer, busybox_layer, local_registry

ROUNDS = 3
UNREACHABLE = "127.0.0.1:9/bench/host:1"  # nothing listens: pull-or-host runs the host's


def big_layers(mb: int, parts: int = 4) -> list[Layer]:
    size = mb * 1_000_000 // parts // 8
    return [Layer().dir(f"data{i}").file(f"data{i}/a", os.urandom(size))
            .file(f"data{i}/b", os.urandom(size * 7)) for i in range(parts)]  # fmt: skip


def tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if not p.is_symlink())


def ours(server: Server, image: str) -> float:
    """One cold pull: the store's layers and index removed first (the server is idle)."""
    with server.client() as api:
        api.post("/_fleetctl/images/prune").raise_for_status()
        for item in api.get("/_fleetctl/images").json()["images"]:
            api.delete(f"/_fleetctl/images/{item['digest']}").raise_for_status()
        api.post("/_fleetctl/images/prune").raise_for_status()
        started = time.perf_counter()
        api.post("/_fleetctl/images/pull", json={"name": image}, timeout=600).raise_for_status()
        return time.perf_counter() - started


def reference(host: str, image: str, scratch: Path) -> float:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    started = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "-q",
            f"docker://{host}/{image}",
            f"oci:{scratch / 'oci'}:bench",
        ],
        check=True,
    )
    subprocess.run(
        [
            "umoci",
            "raw",
            "unpack",
            "--rootless",
            "--image",
            f"{scratch / 'oci'}:bench",
            str(scratch / "rootfs"),
        ],
        check=True,
    )
    return time.perf_counter() - started


def create_ms(api: httpx.Client, image: str) -> float:
    started = time.perf_counter()
    sandbox_id = api.post("/sandbox", json={"name": "b", "docker_image": image}).json()["id"]
    while True:
        status = api.get(f"/sandbox/{sandbox_id}").json()["status"]
        if status == "RUNNING":
            elapsed = (time.perf_counter() - started) * 1000
            api.delete(f"/sandbox/{sandbox_id}")
            return elapsed
        if status in ("ERROR", "TERMINATED"):
            raise SystemExit(
                f"sandbox of {image} is {status}: {api.get(f'/sandbox/{sandbox_id}').text}"
            )
        time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="image size in MB")
    parser.add_argument("--creates", type=int, default=30, help="creates per root filesystem")
    args = parser.parse_args()
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install skopeo umoci)")
    base = Path(tempfile.mkdtemp(prefix="fleetctl-images-", dir="/tmp"))
    base.chmod(0o711)
    try:
        with local_registry(base) as registry:
            shared = [busybox_layer(), *big_layers(args.mb)]
            registry.push("bench/big", "1", shared)
            own = Layer().file("extra", os.urandom(5_000_000))
            registry.push("bench/second", "1", [*shared, own])
            info, process = start_server(base / "data", "--image-policy", "pull-or-host",
                                         "--insecure-registry", registry.host)  # fmt: skip
            try:
                image = f"{registry.host}/bench/big:1"
                pulls, refs = [], []
                for _ in range(ROUNDS):
                    pulls.append(ours(info, image))
                    refs.append(reference(registry.host, "bench/big:1", base / "ref"))
                with info.client() as api:
                    create_ms(api, image)  # stored from the pulls; warm both paths once
                    create_ms(api, UNREACHABLE)
                    image_ms, host_ms = [], []
                    for _ in range(args.creates):
                        image_ms.append(create_ms(api, image))
                        host_ms.append(create_ms(api, UNREACHABLE))
                    layers = info.data_dir / "images" / "layers"
                    before = tree_bytes(layers)
                    second = {"name": f"{registry.host}/bench/second:1"}
                    pulled = api.post("/_fleetctl/images/pull", json=second, timeout=600)
                    pulled.raise_for_status()
                    added = tree_bytes(layers) - before
            finally:
                stop_server(process)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    pull_s, ref_s = min(pulls), min(refs)
    image_p50, host_p50 = statistics.median(image_ms), statistics.median(host_ms)
    own_mb = len(own.tar()) / 1e6
    print(
        f"image of {args.mb} MB in 5 layers; pull + unpack, best of {ROUNDS}: ours "
        f"{pull_s:.2f} s (all {[round(p, 2) for p in pulls]}), skopeo copy + umoci unpack "
        f"{ref_s:.2f} s (all {[round(r, 2) for r in refs]})"
    )
    print(
        f"create -> RUNNING p50 over {args.creates}: stored image {image_p50:.1f} ms, host "
        f"root filesystem {host_p50:.1f} ms"
    )
    print(
        f"a second image sharing the base adds {added / 1e6:.1f} MB to the store "
        f"(its own layer: {own_mb:.1f} MB)"
    )
    print(
        f"pull_s={pull_s:.2f} reference_s={ref_s:.2f} pull_ratio={pull_s / ref_s:.2f} "
        f"create_image_p50_ms={image_p50:.1f} create_host_p50_ms={host_p50:.1f} "
        f"create_ratio={image_p50 / host_p50:.2f} second_image_added_mb={added / 1e6:.1f} "
        f"second_image_own_mb={own_mb:.1f}"
    )


if __name__ == "__main__":
    main()
