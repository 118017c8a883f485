"""`fleetctl image` against a pulling server: pull, ls, rm, prune, import."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from fleetctl.sandboxes import APIClient, CreateSandboxRequest, SandboxClient
from tests.conftest import Server, own_server, wait_for
from tests.conftest import run_cli as run
from tests.images.conftest import NO_INTERNET
from tests.images.registry import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Layer,
    Registry,
    busybox_layer,
    digest_of,
    free_port,
)


@pytest.fixture
def pointed(puller: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("FLEETCTL_API_URL", puller.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", puller.token)
    return puller


def layer_dirs(server: Server) -> set[str]:
    return {p.name for p in (server.data_dir / "images" / "layers").iterdir()}


def test_pull_ls_rm_and_prune(
    pointed: Server, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    base = busybox_layer()
    first = registry.push("tests/cli-a", "1", [base, Layer().file("a", b"a")])
    registry.push("tests/cli-b", "1", [base, Layer().file("b", b"b")])
    code, out, _ = run(capsys, "image", "pull", f"{registry.host}/tests/cli-a:1")
    assert (code, first in out) == (0, True)
    assert run(capsys, "image", "pull", f"{registry.host}/tests/cli-b:1")[0] == 0
    code, out, _ = run(capsys, "image", "ls", "-o", "json")
    listed = {i["digest"]: i for i in json.loads(out)}
    assert code == 0
    assert listed[first]["refs"][0] == f"{registry.host}/tests/cli-a:1"
    assert 0 < listed[first]["shared_size"] < listed[first]["size"]  # the busybox base
    # an image a sandbox runs cannot be removed
    with pointed.client() as api:
        image = f"{registry.host}/tests/cli-a:1"
        sandbox = api.post("/sandbox", json={"name": "r", "docker_image": image}).json()
        wait_for(api, sandbox["id"], "RUNNING")
        code, _, err = run(capsys, "image", "rm", image)
        assert code != 0
        assert "used by running sandboxes" in err
        api.delete(f"/sandbox/{sandbox['id']}")
    before = layer_dirs(pointed)
    assert run(capsys, "image", "rm", f"{registry.host}/tests/cli-a:1")[0] == 0
    code, out, _ = run(capsys, "image", "prune")
    assert code == 0
    assert "removed 1 layers" in out  # cli-a's own; the base stays for cli-b
    assert len(layer_dirs(pointed)) == len(before) - 1
    code, _, err = run(capsys, "image", "rm", f"{registry.host}/tests/cli-a:1")
    assert code != 0
    assert "no image" in err


def oci_layout(root: Path, name: str, layers: list[Layer], marker: bytes) -> Path:
    """An OCI image layout directory (as `skopeo copy … oci:DIR` writes one)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = digest_of(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    descriptors, diff_ids = [], []
    for layer in [*layers, Layer().file("marker", marker)]:
        data, media_type, diff_id = layer.blob()
        descriptors.append({"mediaType": media_type, **put(data)})
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "layers": descriptors,
            "config": {"mediaType": OCI_CONFIG, **put(config)},
        }
    ).encode()
    entry = {
        "mediaType": OCI_MANIFEST,
        **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": name},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def test_import_loads_an_oci_layout_and_its_tar_for_air_gapped_hosts(
    pointed: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    linked = Layer().hardlink("passwd-link", "etc/passwd")  # to a lower layer's file
    layout = oci_layout(tmp_path / "layout", "airgap/eval:1", [busybox_layer(), linked], b"dir")
    code, out, err = run(capsys, "image", "import", str(layout))
    assert code == 0, err
    assert "docker.io/airgap/eval:1" in out
    tarred = oci_layout(tmp_path / "other", "airgap/eval:2", [busybox_layer()], b"tar")
    with tarfile.open(tmp_path / "eval.tar", "w") as tar:
        tar.add(tarred, arcname=".")
    assert run(capsys, "image", "import", str(tmp_path / "eval.tar"))[0] == 0
    sdk = SandboxClient(APIClient(api_key=pointed.token, base_url=pointed.url))
    for tag, marker in (("1", "dir"), ("2", "tar")):
        # stored: no registry is asked (docker.io cannot be reached from this server)
        made = sdk.create(CreateSandboxRequest(name="i", docker_image=f"airgap/eval:{tag}"))
        sdk.wait_for_creation(made.id)
        assert sdk.execute_command(made.id, "cat /marker").stdout == marker
        if tag == "1":
            assert sdk.execute_command(made.id, "head -c5 /passwd-link").stdout == "root:"
        sdk.delete(made.id)
    sdk.close()
    code, _, err = run(capsys, "image", "import", str(tmp_path / "missing.tar"))
    assert code != 0
    assert "neither a directory nor a file" in err


def test_import_refuses_archives_past_the_image_limit_and_compressed_ones(
    pointed: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.tar"
    with big.open("wb") as out:
        out.truncate(60_000_000)  # the server was started with --image-max-gb 0.05
    code, _, err = run(capsys, "image", "import", str(big))
    assert code != 0
    assert "larger than" in err
    layout = oci_layout(tmp_path / "layout", "airgap/gz:1", [busybox_layer()], b"gz")
    with tarfile.open(tmp_path / "eval.tar.gz", "w:gz") as tar:
        tar.add(layout, arcname=".")
    code, _, err = run(capsys, "image", "import", str(tmp_path / "eval.tar.gz"))
    assert code != 0
    assert "cannot be read as a tar" in err
    assert list((pointed.data_dir / "images" / "layers").glob("tmp-*")) == []


def test_apply_and_status_warn_when_sandboxes_fell_back_to_the_host_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = f"127.0.0.1:{free_port()}/tests/gone:1"
    spec = tmp_path / "fleet.yaml"
    spec.write_text("apiVersion: fleetctl/v1\nkind: Fleet\nname: t-fallback\n"
                    f"defaults: {{image: '{nowhere}', memory_gb: 0.25}}\n"
                    "sandboxes:\n  - name: w\n    replicas: 2\n")  # fmt: skip
    with own_server("--image-policy", "pull-or-host", env=NO_INTERNET) as (server, _):
        monkeypatch.setenv("FLEETCTL_API_URL", server.url)
        monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
        code, _, err = run(capsys, "apply", str(spec), "--yes")
        assert code == 0, err
        warning = f"warning: image '{nowhere}' could not be pulled (no registry reachable): 2"
        assert warning in err
        code, _, err = run(capsys, "status", str(spec))
        assert code == 0
        assert warning in err
        assert run(capsys, "destroy", str(spec), "--yes")[0] == 0
