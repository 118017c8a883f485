"""The spec loader: valid specs expand as documented; each invalid spec reports the
exact message, line, column and field path, all problems at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleetctl.errors import UsageError
from fleetctl.spec import REPLICA_ENV, SpecError, load

HEADER = "apiVersion: fleetctl/v1\nkind: Fleet\nname: demo\n"


def write(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def problems(tmp_path: Path, body: str, variables: dict[str, object] | None = None) -> list[str]:
    path = write(tmp_path, body)
    with pytest.raises(SpecError) as caught:
        load([str(path)], variables)
    prefix = f"{path}:"
    return [str(d).removeprefix(prefix) for d in caught.value.diagnostics]


INVALID = [
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n"
        "    egress: {allow: [1.2.3.4], deny: [5.6.7.8]}\n",
        ["7:13: sandboxes[0].egress: egress takes exactly one of allow or deny"],
        id="egress-both-lists",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    egress: {deny: ['example.com:22']}\n",
        [
            "7:13: sandboxes[0].egress: network_denylist: 'example.com:22': domain entries "
            "support only ports 80 and 443; use an IP or CIDR entry for other ports"
        ],
        id="egress-domain-port",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    imgae: x\n",
        ["6:5: sandboxes[0].imgae: unknown field 'imgae'; did you mean 'image'?"],
        id="misspelt-key-suggests",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    expose:\n      - {port: 8080}\n",
        [
            "8:16: sandboxes[0].expose[0].port: port 8080 is reserved by the sandbox platform "
            "(2222, 8080 and 8081 cannot be exposed)"
        ],
        id="reserved-port",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    expose: [{port: 21}]\n",
        ["7:21: sandboxes[0].expose[0].port: input should be greater than or equal to 22"],
        id="port-below-range",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    expose: [{port: 80}, {port: 80}]\n",
        ["7:33: sandboxes[0].expose[1].port: port 80 appears twice in expose"],
        id="duplicate-port",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    expose: [{port: 80, protocol: UDP}]\n",
        ["7:35: sandboxes[0].expose[0].protocol: input should be 'HTTP' or 'TCP'"],
        id="bad-protocol",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    secrets: {TOKEN: sk-live-123}\n",
        [
            "7:22: sandboxes[0].secrets.TOKEN: inline secret values are not allowed: write "
            "{from_env: NAME} or {from_file: PATH} so the value stays out of the spec"
        ],
        id="inline-secret",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    timeout_minutes: 1441\n",
        ["7:22: sandboxes[0].timeout_minutes: input should be less than or equal to 1440"],
        id="timeout-too-long",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: Web_1\n    image: x\n",
        [
            "5:11: sandboxes[0].name: must be a DNS label: 1-63 lowercase letters, digits and "
            "'-', starting and ending with a letter or digit"
        ],
        id="name-not-dns-label",
    ),
    pytest.param(
        HEADER
        + "sandboxes:\n  - name: a\n    replicas: 2\n    image: x\n  - name: a-1\n    image: x\n",
        [
            "8:11: sandboxes[1].name: sandbox key 'a-1' is also produced by sandboxes[0]; keys "
            "must be unique after replica expansion"
        ],
        id="key-collision-after-expansion",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n",
        [
            "5:11: sandboxes[0].name: no image: set image (or from_checkpoint) in this group or "
            "under defaults:"
        ],
        id="no-image",
    ),
    pytest.param(
        HEADER
        + "sandboxes:\n  - name: a\n    image: x\n    files: [{source: ./missing, target: /w}]\n",
        [
            "7:22: sandboxes[0].files[0].source: source './missing' does not exist (paths are "
            "relative to the spec file)"
        ],
        id="missing-file-source",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    replicas: {{ count }}\n",
        [
            "7:18: undefined variable 'count': give it a default under vars:, or pass "
            "--var count=VALUE or --var-file"
        ],
        id="undefined-variable",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    image: y\n",
        ["7:5: sandboxes[0].image: duplicate key 'image' (first defined at line 6)"],
        id="duplicate-key",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: [x\n",
        ["7:1: invalid YAML: expected ',' or ']', but got '<stream end>'"],
        id="yaml-syntax",
    ),
    pytest.param(
        "apiVersion: fleetctl/v2\nkind: Fleet\nname: demo\nsandboxes: []\n",
        ["1:13: apiVersion: input should be 'fleetctl/v1'"],
        id="wrong-api-version",
    ),
    pytest.param(
        "kind: Fleet\nname: demo\n",
        [
            "1:1: apiVersion: missing required field 'apiVersion'",
            "1:1: sandboxes: missing required field 'sandboxes'",
        ],
        id="missing-required-fields",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    env: {FLAG: true}\n",
        [
            '7:17: sandboxes[0].env.FLAG: quote boolean values ("true"): environment values '
            "are strings"
        ],
        id="unquoted-boolean-env",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    env: {A: '1'}\n"
        "    secrets: {A: {from_env: A}}\n",
        ["8:15: sandboxes[0].secrets.A: 'A' is both an env variable and a secret"],
        id="env-secret-clash",
    ),
    pytest.param(
        HEADER + "labels: [fleetctl.owner]\nsandboxes: []\n",
        ["4:10: labels[0]: labels starting with 'fleetctl.' are reserved for fleetctl"],
        id="reserved-label",
    ),
    pytest.param(
        HEADER
        + "sandboxes:\n  - name: a\n    image: x\n    secrets: {T: {from_env: A, from_file: b}}\n",
        ["7:18: sandboxes[0].secrets.T: give exactly one of from_env or from_file"],
        id="secret-two-sources",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    from_checkpoint: ckpt-1\n",
        [
            "7:22: sandboxes[0].from_checkpoint: give image or from_checkpoint, not both: a "
            "checkpoint has its own image"
        ],
        id="image-and-checkpoint",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    timeout_minutes: 5\n"
        "    idle_timeout_minutes: 6\n",
        [
            "8:27: sandboxes[0].idle_timeout_minutes: idle_timeout_minutes (6) cannot exceed "
            "timeout_minutes (5)"
        ],
        id="idle-past-lifetime",
    ),
    pytest.param(
        HEADER + "sandboxes:\n  - name: a\n    image: x\n    prepare: {timeout_minutes: 3}\n",
        ["7:14: sandboxes[0].prepare.command: missing required field 'command'"],
        id="prepare-without-command",
    ),
    pytest.param(
        "- just\n- a list\n",
        ["1:1: a fleet spec must be a mapping (apiVersion, kind, name, sandboxes)"],
        id="not-a-mapping",
    ),
]


@pytest.mark.parametrize(("body", "expected"), INVALID)
def test_invalid_spec_reports_exact_position_and_message(
    tmp_path: Path, body: str, expected: list[str]
) -> None:
    assert problems(tmp_path, body) == expected


def test_all_problems_reported_at_once_sorted_by_position(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        HEADER + "labels: [Bad Label]\nsandboxes:\n  - name: a\n    cpu_cores: 0\n"
        "  - name: b\n    memroy_gb: 1\n",
    )
    assert [p.split(":")[0] for p in found] == ["4", "7", "9"]
    assert "did you mean 'memory_gb'?" in found[2]


def test_secret_value_never_in_error(tmp_path: Path) -> None:
    canary = "sk-CANARY-9f8e7d"
    body = HEADER + f"sandboxes:\n  - name: a\n    image: x\n    secrets: {{T: {canary}}}\n"
    path = write(tmp_path, body)
    with pytest.raises(SpecError) as caught:
        load([str(path)])
    assert canary not in str(caught.value)


VALID = textwrap.dedent(
    """\
    apiVersion: fleetctl/v1
    kind: Fleet
    name: eval
    labels: [exp]
    vars: {shards: 2, model: tiny}
    defaults:
      image: python:3.11-slim
      memory_gb: 1
      env: {A: "1", B: "2"}
      labels: [base]
      expose: [{port: 8000}]
    sandboxes:
      - name: shard
        replicas: "{{ shards }}"
        env: {B: "3", MODEL: "{{ model }}"}
        labels: [gpu]
        secrets: {TOKEN: {from_env: HF_TOKEN}}
      - name: web
        memory_gb: 2
        expose: [{port: 9000, protocol: TCP}]
    """
)


def test_valid_spec_expands_replicas_and_merges_defaults(tmp_path: Path) -> None:
    (fleet,) = load([str(write(tmp_path, VALID))])
    keys = [s.key for s in fleet.sandboxes]
    assert keys == ["shard-0", "shard-1", "web"]
    shard1, web = fleet.sandboxes[1], fleet.sandboxes[2]
    assert dict(shard1.env) == {"A": "1", "B": "3", "MODEL": "tiny", REPLICA_ENV: "1"}
    assert shard1.labels == ("exp", "base", "gpu")
    assert shard1.memory_gb == 1.0
    assert web.memory_gb == 2.0
    assert [e.port for e in shard1.expose] == [8000]
    assert [(e.port, e.protocol) for e in web.expose] == [(9000, "TCP")]
    assert web.env[REPLICA_ENV] == "0"
    assert (web.timeout_minutes, web.network_access, web.cpu_cores) == (60, True, 1.0)
    assert shard1.to_dict()["secrets"] == {"TOKEN": "<secret:from_env:HF_TOKEN>"}


def test_a_checkpoint_replaces_the_image_of_defaults_and_a_setup_is_kept(
    tmp_path: Path,
) -> None:
    body = HEADER + textwrap.dedent("""\
        defaults: {image: python:3.11-slim, idle_timeout_minutes: 10}
        sandboxes:
          - {name: restored, from_checkpoint: ckpt-7}
          - {name: built, prepare: {command: pip install x}}
        """)  # fmt: skip
    (fleet,) = load([str(write(tmp_path, body))])
    restored, built = fleet.sandboxes
    assert (restored.image, restored.from_checkpoint) == (None, "ckpt-7")
    assert (built.image, built.idle_timeout_minutes) == ("python:3.11-slim", 10)
    assert built.prepare is not None
    assert (built.prepare.command, built.prepare.timeout_minutes) == ("pip install x", 30)
    assert type(built).from_record(built.to_record()) == built


def test_var_overrides_spec_defaults_and_is_typed(tmp_path: Path) -> None:
    (fleet,) = load([str(write(tmp_path, VALID))], {"shards": 3, "model": "big"})
    assert [s.key for s in fleet.sandboxes] == ["shard-0", "shard-1", "shard-2", "web"]
    assert fleet.sandboxes[0].env["MODEL"] == "big"


def test_unused_var_is_a_usage_error_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match="variable 'shard' is not used by any of the specs; did you mean 'shards'"
    ):
        load([str(write(tmp_path, VALID))], {"shard": 3})


def test_env_function_reads_environment_with_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = HEADER + 'sandboxes:\n  - name: a\n    image: \'{{ env("IMG", "base:1") }}\'\n'
    monkeypatch.delenv("IMG", raising=False)
    assert load([str(write(tmp_path, body))])[0].sandboxes[0].image == "base:1"
    monkeypatch.setenv("IMG", "custom:2")
    assert load([str(write(tmp_path, body))])[0].sandboxes[0].image == "custom:2"


def test_env_function_without_default_names_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    found = problems(tmp_path, HEADER + "sandboxes: []\nlabels: ['{{ env(\"NOPE_NOT_SET\") }}']\n")
    assert found == [
        "5:19: environment variable 'NOPE_NOT_SET' is not set and env() was given no default"
    ]


def test_sandboxed_template_cannot_reach_python(tmp_path: Path) -> None:
    found = problems(tmp_path, HEADER + "sandboxes: []\nlabels: ['{{ ().__class__ }}']\n")
    assert found == [
        "5:1: template error: access to attribute '__class__' of 'tuple' object is unsafe."
    ]


def test_directory_loads_every_yaml_and_multi_documents(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER.replace("demo", "one")
        + "sandboxes: []\n---\n"
        + HEADER.replace("demo", "two")
        + "sandboxes: []\n",
        "a.yaml",
    )
    write(tmp_path, HEADER.replace("demo", "three") + "sandboxes: []\n", "b.yaml")
    write(tmp_path, "not: a spec", "notes.txt")
    assert [f.name for f in load([str(tmp_path)])] == ["one", "two", "three"]


def test_duplicate_fleet_name_across_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, HEADER + "sandboxes: []\n", "a.yaml")
    second = write(tmp_path, "# x\n" + HEADER + "sandboxes: []\n", "b.yaml")
    with pytest.raises(SpecError) as caught:
        load([str(tmp_path)])
    assert [str(d) for d in caught.value.diagnostics] == [
        f"{second}:4:7: name: fleet 'demo' is also defined in {tmp_path / 'a.yaml'}"
    ]


def test_second_document_positions_are_file_lines(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        HEADER
        + "sandboxes: []\n---\n"
        + HEADER.replace("demo", "x")
        + "sandboxes: [{name: a, image: b, cpu_cores: -1}]\n",
    )
    assert found == ["9:44: sandboxes[0].cpu_cores: input should be greater than 0"]


def test_missing_path_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such spec file or directory"):
        load([str(tmp_path / "nope.yaml")])


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    assert problems(tmp_path, "# only a comment\n") == ["1:1: file holds no fleet spec"]
