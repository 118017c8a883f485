"""The checked-in JSON Schema and README reference are exactly what the models generate."""

from __future__ import annotations

from fleetctl.docgen import README_FILE, SCHEMA_FILE, readme_text
from fleetctl.spec.schema import fleet_schema, schema_text


def test_schema_file_matches_models() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "schemas/fleet.schema.json is stale: run `python -m fleetctl.docgen`"
    )


def test_readme_reference_sections_match_models_and_cli() -> None:
    current = README_FILE.read_text(encoding="utf-8")
    assert readme_text(current) == current, (
        "README reference is stale: run python -m fleetctl.docgen"
    )


def test_schema_forbids_unknown_keys_and_reserved_ports() -> None:
    schema = fleet_schema()
    assert schema["additionalProperties"] is False
    port = schema["$defs"]["Exposure"]["properties"]["port"]
    assert port["not"] == {"enum": [2222, 8080, 8081]}
    assert schema["required"] == ["apiVersion", "kind", "name", "sandboxes"]


def test_schema_accepts_template_expressions_for_numbers() -> None:
    replicas = fleet_schema()["$defs"]["SandboxGroup"]["properties"]["replicas"]
    assert any(
        option.get("type") == "string" and "pattern" in option
        for branch in replicas["anyOf"]
        for option in branch.get("anyOf", [branch])
    )
