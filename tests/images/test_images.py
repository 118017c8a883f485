"""Real images from a real registry: pulled, stored by digest, run as the sandbox's root.

Every image here is built by the test and pushed to Debian's docker-registry on loopback;
the server pulls it like any other (plain HTTP by --insecure-registry, no fallback).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.sandboxes import APIClient, CreateSandboxRequest, SandboxClient
from fleetctl.sandboxes.errors import SandboxImagePullError
from tests.conftest import Server, own_server, tidy_client, wait_for
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

pytestmark = pytest.mark.usefixtures("puller")


@pytest.fixture
def sdk(puller: Server) -> Iterator[SandboxClient]:
    """A client of the test server; the test's sandboxes are deleted after it."""
    with tidy_client(puller) as client:
        yield client


def run(sdk: SandboxClient, image: str) -> str:
    sandbox = sdk.create(CreateSandboxRequest(name="img", docker_image=image))
    sdk.wait_for_creation(sandbox.id)
    return sandbox.id


def sh(sdk: SandboxClient, sandbox_id: str, command: str) -> str:
    result = sdk.execute_command(sandbox_id, command)
    assert result.exit_code == 0, (command, result.stdout, result.stderr)
    return result.stdout


def test_a_busybox_image_runs_its_own_root_with_its_config(
    sdk: SandboxClient, registry: Registry, puller: Server
) -> None:
    digest = registry.push(
        "tests/bb", "1", [busybox_layer(), Layer().dir("app").file("etc/motd", b"from image\n")],
        config={"Env": ["GREETING=hello", "PATH=/bin"], "WorkingDir": "/app"},
    )  # fmt: skip
    sandbox_id = run(sdk, f"{registry.host}/tests/bb:1")
    assert sh(sdk, sandbox_id, "cat /etc/motd") == "from image\n"
    absent = sdk.execute_command(sandbox_id, "ls /usr/bin/python3")
    assert absent.exit_code != 0  # the host's tools are not there
    assert sh(sdk, sandbox_id, "echo $GREETING; pwd") == "hello\n/app\n"
    # root inside can write the image's own directories, /tmp and /root
    sh(sdk, sandbox_id, "touch /bin/new /etc/new /tmp/t /root/r && ls /bin/new /root/r")
    with puller.client() as api:
        record = api.get(f"/sandbox/{sandbox_id}").json()
    assert digest in record["imageSource"]


def test_whiteouts_opaque_dirs_links_and_devices(sdk: SandboxClient, registry: Registry) -> None:
    lower = (Layer().dir("data").file("data/keep", b"k").file("data/gone", b"g")
             .dir("opq").file("opq/old", b"o").file("target", b"T"))  # fmt: skip
    upper = (Layer().whiteout("data/gone").opaque("opq").file("opq/new", b"n")
             .file("linked", b"L").hardlink("linked2", "linked").device("dev-node")
             .symlink("abs", "/target").symlink("rel", "data/keep")
             .hardlink("copied", "target"))  # fmt: skip
    registry.push("tests/layers", "1", [busybox_layer(), lower, upper])
    sandbox_id = run(sdk, f"{registry.host}/tests/layers:1")
    assert sh(sdk, sandbox_id, "ls /data; ls /opq") == "keep\nnew\n"
    assert sh(sdk, sandbox_id, "stat -c %i /linked /linked2 | uniq | wc -l").strip() == "1"
    assert sh(sdk, sandbox_id, "cat /abs /rel; ls /dev-node 2>&1 || true").startswith("Tk")
    assert sh(sdk, sandbox_id, "cat /copied") == "T"  # a link to a lower layer's file: a copy
    assert "No such file" in sh(sdk, sandbox_id, "ls /dev-node 2>&1 || true")


def test_an_index_resolves_to_the_host_arch_and_zstd_layers_unpack(
    sdk: SandboxClient, registry: Registry
) -> None:
    mine = registry.push("tests/multi", "amd64", [busybox_layer(), Layer().file("arch", b"amd64")])
    other = registry.push("tests/multi", "arm64", [busybox_layer(), Layer().file("arch", b"arm64")],
                          arch="arm64")  # fmt: skip
    registry.push_index("tests/multi", "1", {"amd64": mine, "arm64": other})
    zstd = Layer(compression="zstd").file("zstd-file", b"z")
    registry.push("tests/zstd", "1", [busybox_layer(), zstd])
    assert sh(sdk, run(sdk, f"{registry.host}/tests/multi:1"), "cat /arch") == "amd64"
    assert sh(sdk, run(sdk, f"{registry.host}/tests/zstd:1"), "cat /zstd-file") == "z"


@pytest.mark.parametrize(
    ("name", "layer", "reason"),
    [
        ("escape", Layer().file("../../etc/fleetctl-escape", b"x"), "'..'"),
        ("absolute", Layer().file("/abs-escape", b"x"), "absolute"),
        ("through-symlink", Layer().symlink("etc2", "/etc").file("etc2/fleetctl-x", b"x"),
         "symlink"),
        ("bomb", Layer().file("zeros", bytes(80 << 20)), "more than"),
        ("dangling-link", Layer().hardlink("nowhere", "etc/none"), "nor a layer below"),
        ("link-to-symlink", Layer().hardlink("sh2", "bin/sh"), "nor a layer below"),
    ],
)  # fmt: skip
def test_hostile_layers_fail_the_pull_and_write_nothing_outside(
    sdk: SandboxClient, registry: Registry, puller: Server, name: str, layer: Layer, reason: str
) -> None:
    registry.push(f"tests/hostile-{name}", "1", [busybox_layer(), layer])
    sandbox = sdk.create(
        CreateSandboxRequest(name=name, docker_image=f"{registry.host}/tests/hostile-{name}:1")
    )
    with pytest.raises(SandboxImagePullError) as failed:
        sdk.wait_for_creation(sandbox.id)
    assert reason in str(failed.value)
    for outside in ("/etc/fleetctl-escape", "/abs-escape", "/etc/fleetctl-x"):
        assert not Path(outside).exists()
    assert list((puller.data_dir / "images" / "layers").glob("tmp-*")) == []


def test_a_missing_image_and_a_lying_config_fail_with_the_reason(
    sdk: SandboxClient, registry: Registry
) -> None:
    sandbox = sdk.create(
        CreateSandboxRequest(name="m", docker_image=f"{registry.host}/tests/none:1")
    )
    with pytest.raises(SandboxImagePullError, match="not found"):
        sdk.wait_for_creation(sandbox.id)


def test_concurrent_creates_pull_once_and_images_share_base_layers(
    sdk: SandboxClient, registry: Registry, puller: Server
) -> None:
    base, one = busybox_layer(), Layer().file("one", b"1")
    registry.push("tests/once", "1", [base, one])
    registry.push("tests/twice", "1", [base, Layer().file("two", b"2")])
    store = puller.data_dir / "images" / "layers"
    before = {p.name for p in store.iterdir()}
    names = [*(["once"] * 4), "twice"]
    ids = [sdk.create(CreateSandboxRequest(name=f"c{i}", docker_image=image)).id
           for i, image in enumerate(f"{registry.host}/tests/{n}:1" for n in names)]  # fmt: skip
    sdk.bulk_wait_for_creation(ids)
    assert sh(sdk, ids[0], "cat /one") == "1"
    assert sh(sdk, ids[-1], "cat /two") == "2"
    one_blob = digest_of(one.blob()[0])
    assert registry.blob_gets().get(one_blob) == 1  # four creates at once, one download
    _, _, base_diff = base.blob()
    added = {p.name for p in store.iterdir()} - before
    assert added <= {
        base_diff[7:23],
        digest_of(one.tar())[7:23],
        digest_of(Layer().file("two", b"2").tar())[7:23],
    }
    assert (store / base_diff[7:23]).is_dir()  # the shared base: one directory for both


def test_a_layer_linking_to_files_below_is_stored_per_stack_and_its_copies_are_bounded(
    sdk: SandboxClient, registry: Registry
) -> None:
    """The same linking layer over two different bases: each image sees its own base's
    file (a layer whose content depends on the layers under it is never shared by diff_id,
    or the first image pulled would decide what the other runs)."""
    linking = Layer().hardlink("copied", "target").hardlink("again", "copied")
    linking.whiteout("gone")  # a link to a file the same layer then removes
    linking.entries.insert(0, Layer().hardlink("gone", "target").entries[0])
    for name, content in (("good", b"good"), ("evil", b"evil")):
        registry.push(f"tests/chain-{name}", "1",
                      [busybox_layer(), Layer().file("target", content), linking])  # fmt: skip
    for name in ("evil", "good"):  # the hostile stack first
        sandbox_id = run(sdk, f"{registry.host}/tests/chain-{name}:1")
        assert sh(sdk, sandbox_id, "cat /copied /again; ls /gone 2>&1 || true") == (
            f"{name}{name}ls: /gone: No such file or directory\n"
        )
    # copies count against the layer limit (50 MB here): 2 of a 30 MB file do not fit
    big, links = Layer().file("big", bytes(30 << 20)), Layer().hardlink("b1", "big")
    registry.push("tests/link-bomb", "1", [busybox_layer(), big, links.hardlink("b2", "big")])
    bomb = sdk.create(
        CreateSandboxRequest(name="b", docker_image=f"{registry.host}/tests/link-bomb:1")
    )
    with pytest.raises(SandboxImagePullError, match="more than its limit"):
        sdk.wait_for_creation(bomb.id)


def test_a_config_that_lies_about_its_layers_fails_the_pull(
    sdk: SandboxClient, registry: Registry
) -> None:
    layer_data, media_type, _ = busybox_layer().blob()
    blob = registry.put_blob("tests/liar", layer_data)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
        }
    ).encode()
    config_digest = registry.put_blob("tests/liar", config)
    registry.put_manifest("tests/liar", "1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": media_type, "digest": blob, "size": len(layer_data)}],
    })  # fmt: skip
    registry.put_blob("tests/short", config)
    registry.put_manifest("tests/short", "1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": media_type, "digest": registry.put_blob("tests/short", layer_data),
                    "size": 1000}],
    })  # fmt: skip
    for name, reason in (("liar", "not the diff_id"), ("short", "longer than")):
        image = f"{registry.host}/tests/{name}:1"
        sandbox = sdk.create(CreateSandboxRequest(name=name, docker_image=image))
        with pytest.raises(SandboxImagePullError, match=reason):
            sdk.wait_for_creation(sandbox.id)


def test_an_unreachable_registry_fails_under_pull_and_falls_back_loudly_under_pull_or_host(
    sdk: SandboxClient,
) -> None:
    nowhere = f"127.0.0.1:{free_port()}/tests/gone:1"
    sandbox = sdk.create(CreateSandboxRequest(name="u", docker_image=nowhere))
    with pytest.raises(SandboxImagePullError, match="cannot reach the registry"):
        sdk.wait_for_creation(sandbox.id)
    with own_server("--image-policy", "pull-or-host") as (server, _), server.client() as api:
        created = api.post("/sandbox", json={"name": "f", "docker_image": nowhere}).json()
        record = wait_for(api, created["id"], "RUNNING")
        assert record["imageSource"].startswith("host root filesystem")
        assert "FALLBACK" in record["imageSource"]
        logs = api.get(f"/sandbox/{created['id']}/logs").json()["logs"]
        assert "WARNING: image" in logs
        assert "was not pulled" in logs
        api.delete(f"/sandbox/{created['id']}")


def test_a_checkpoint_of_an_image_sandbox_restores_onto_the_same_image(
    sdk: SandboxClient, registry: Registry
) -> None:
    registry.push("tests/ckpt", "1", [busybox_layer(), Layer().file("etc/motd", b"image\n")])
    source = run(sdk, f"{registry.host}/tests/ckpt:1")
    sh(sdk, source, "echo changed > /etc/motd && echo w > /workspace/w && rm /bin/grep")
    checkpoint = sdk.wait_for_checkpoint(sdk.checkpoint(source).id)
    restored = sdk.create(CreateSandboxRequest(name="r", checkpoint_id=checkpoint.id))
    sdk.wait_for_creation(restored.id)
    assert sh(sdk, restored.id, "cat /etc/motd /workspace/w; ls /bin/grep 2>&1 || true") == (
        "changed\nw\nls: /bin/grep: No such file or directory\n"
    )
    sdk.delete(restored.id)
    sdk.delete(source)
    sdk.delete_checkpoint(checkpoint.id)


def test_docker_hub_names_are_pulled_through_a_mirror(registry: Registry) -> None:
    registry.push("library/mirrored", "1", [busybox_layer(), Layer().file("via", b"mirror")])
    flags = ("--image-policy", "pull", "--registry-mirror", registry.url)
    with own_server(*flags, env=NO_INTERNET) as (server, _):
        sdk = SandboxClient(APIClient(api_key=server.token, base_url=server.url))
        sandbox_id = run(sdk, "mirrored:1")  # docker.io/library/mirrored:1
        assert sh(sdk, sandbox_id, "cat /via") == "mirror"
        sdk.delete(sandbox_id)
        sdk.close()


def test_an_image_with_more_layers_than_an_overlay_stacks_runs_its_bottom_merged(
    sdk: SandboxClient, registry: Registry, puller: Server
) -> None:
    """70 layers: the bottom ones are merged into one directory (whiteouts and opaque dirs
    applied), the top ones stacked as they are; the sandbox sees the same files."""
    layers = [busybox_layer(), Layer().dir("o").file("o/old", b"o").file("gone", b"g")]
    layers += [Layer().file(f"f{i}", str(i).encode()) for i in range(30)]
    layers += [Layer().whiteout("gone").opaque("o").file("o/new", b"n")]
    layers += [Layer().file(f"f{i}", str(i).encode()) for i in range(30, 68)]
    registry.push("tests/tall", "1", layers)
    sandbox_id = run(sdk, f"{registry.host}/tests/tall:1")
    assert sh(sdk, sandbox_id, "cat /f0 /f29 /f67; ls /o; ls /gone 2>&1 || true") == (
        "02967new\nls: /gone: No such file or directory\n"
    )
    merged = [p for p in (puller.data_dir / "images" / "layers").iterdir() if p.name[0] == "m"]
    assert len(merged) == 1


def user_image(registry: Registry, tag: str, user: str) -> str:
    """busybox with a user `app` (1000, also in group staff 50) who owns /home/app."""
    accounts = (
        Layer().dir("home").dir("home/app").file("home/app/own", b"o", uid=1000)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                            b"app:x:1000:1000::/home/app:/bin/sh\n")
        .file("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:other,app\n")
    )  # fmt: skip
    accounts.entries[1][0].uid = accounts.entries[1][0].gid = 1000  # home/app is app's
    registry.push("tests/user", tag, [busybox_layer(), accounts],
                  config={"User": user, "WorkingDir": "/home/app"})  # fmt: skip
    return f"{registry.host}/tests/user:{tag}"


def test_the_image_user_runs_the_start_command_and_commands_and_root_stays_root(
    sdk: SandboxClient, registry: Registry
) -> None:
    image = user_image(registry, "app", "app")
    started = "id > /tmp/started; exec sleep 600"
    created = sdk.create(CreateSandboxRequest(name="u", docker_image=image, start_command=started))
    sdk.wait_for_creation(created.id)
    assert sh(sdk, created.id, "id -u; id -g; id -G; echo $HOME; pwd") == (
        "1000\n1000\n1000 50\n/home/app\n/home/app\n"
    )
    assert sh(sdk, created.id, "cat /tmp/started").startswith("uid=1000(app) gid=1000(app)")
    # the image's files keep their owners; the user writes its home and /workspace only
    assert sh(sdk, created.id, "stat -c '%u %U' /home/app/own /etc/passwd") == "1000 app\n0 root\n"
    sh(sdk, created.id, "touch /home/app/made /workspace/w /tmp/t")
    assert sdk.execute_command(created.id, "touch /etc/x").exit_code != 0
    # root is still root (docker exec -u root), and other ids run as themselves
    as_root = sdk.execute_command(created.id, "id -u; touch /etc/x && echo ok", user="root")
    assert as_root.stdout == "0\nok\n"
    assert sdk.execute_command(created.id, "id -u; id -g", user="4321:50").stdout == "4321\n50\n"
    # a checkpoint keeps the owners, and the restored sandbox runs as the image's user
    checkpoint = sdk.wait_for_checkpoint(sdk.checkpoint(created.id).id)
    restored = sdk.create(CreateSandboxRequest(name="r", checkpoint_id=checkpoint.id))
    sdk.wait_for_creation(restored.id)
    assert sh(sdk, restored.id, "id -u; stat -c %U /home/app/made /workspace/w") == (
        "1000\napp\napp\n"
    )
    sdk.delete(restored.id)
    sdk.delete_checkpoint(checkpoint.id)


def test_numeric_and_unknown_image_users(
    sdk: SandboxClient, registry: Registry, puller: Server
) -> None:
    numeric = run(sdk, user_image(registry, "numeric", "4321:staff"))
    assert sh(sdk, numeric, "id -u; id -g; echo $HOME") == "4321\n50\n/\n"
    unknown = user_image(registry, "ghost", "ghost")
    ghost = sdk.create(CreateSandboxRequest(name="g", docker_image=unknown))
    with puller.client() as api:
        record = wait_for(api, ghost.id, "ERROR")
        logs = api.get(f"/sandbox/{ghost.id}/logs").json()["logs"]
    assert record["errorType"] == "START_FAILED"
    assert "unable to find user ghost: no matching entries in passwd file" in record["errorMessage"]
    assert "unable to find user ghost" in logs
