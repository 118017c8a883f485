"""Generated documentation: the JSON Schema file and the README's reference sections.

`python -m fleetctl.docgen` rewrites them; tests fail when the checked-in copies
differ from what the models and the CLI generate, so docs never drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import typer

from fleetctl.cli import app
from fleetctl.spec.schema import TEMPLATE_STRING, fleet_schema, schema_text

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "fleet.schema.json"
README_FILE = ROOT / "README.md"


def spec_reference() -> str:
    """Markdown tables of every spec object, from the JSON Schema."""
    schema = fleet_schema()
    definitions: dict[str, Any] = schema.get("$defs", {})
    sections = [_object_table("Fleet (top level)", schema)]
    order = ["SandboxSettings", "SandboxGroup", "SecretRef", "FileSpec", "Exposure", "Job"]
    inherited = set(definitions["SandboxSettings"]["properties"])
    for name in order:
        definition = definitions[name]
        if name == "SandboxGroup":
            own = {k: v for k, v in definition["properties"].items() if k not in inherited}
            definition = {
                **definition,
                "description": definition["description"]
                + " Takes every SandboxSettings field too.",
                "properties": own,
            }
        sections.append(_object_table(name, definition))
    return "\n".join(sections)


def _object_table(title: str, schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    lines = [f"#### {title}", "", schema.get("description", "").strip(), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        default = (
            "required"
            if name in required
            else f"`{prop['default']}`"
            if prop.get("default") not in (None, [], {})
            else ""
        )
        lines.append(
            f"| `{name}` | {_type_name(prop)} | {default} | {prop.get('description', '')} |"
        )
    return "\n".join(lines) + "\n"


def _type_name(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if "const" in prop:
        return f"`{prop['const']}`"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        options = [p for p in prop["anyOf"] if p.get("type") != "null" and p != TEMPLATE_STRING]
        return " \\| ".join(dict.fromkeys(_type_name(p) for p in options))
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type_name(prop.get('items', {}))}"
    values = [*prop.get("patternProperties", {}).values(), prop.get("additionalProperties")]
    if kind == "object" and isinstance(values[0], dict):
        return f"map of {_type_name(values[0])}"
    return str(kind)


def cli_reference() -> str:
    """Markdown of every command: usage, summary, options and example."""
    return "\n".join(_command_docs(typer.main.get_command(app), "fleetctl"))


def _command_docs(group: Any, prefix: str) -> list[str]:
    # `group` is a click command or group (typer vendors click; its types are private)
    parts: list[str] = []
    for name, command in sorted(getattr(group, "commands", {}).items()):
        arguments = " ".join(
            f"{(p.metavar or p.name or '').upper()}..."
            if p.nargs == -1
            else (p.metavar or p.name or "").upper()
            for p in command.params
            if p.param_type_name == "argument"
        )
        usage = " ".join(filter(None, [prefix, name, arguments]))
        parts += [f"#### `{usage}`", "", (command.help or "").strip(), ""]
        options = [p for p in command.params if p.param_type_name == "option"]
        if options:
            parts += ["| option | description |", "|---|---|"]
            for option in options:
                flags = ", ".join(f"`{o}`" for o in [*option.opts, *option.secondary_opts])
                parts.append(f"| {flags} | {getattr(option, 'help', '') or ''} |")
            parts.append("")
        if command.epilog:
            parts += [command.epilog.strip(), ""]
        parts += _command_docs(command, f"{prefix} {name}")
    return parts


def replace_section(text: str, name: str, body: str) -> str:
    """Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->`."""
    pattern = re.compile(
        rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.DOTALL
    )
    if not pattern.search(text):
        raise ValueError(f"README has no '{name}' section markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def readme_text(current: str) -> str:
    """The README with its generated sections brought up to date."""
    text = replace_section(current, "spec-reference", spec_reference())
    return replace_section(text, "cli-reference", cli_reference())


def main() -> int:
    SCHEMA_FILE.write_text(schema_text(), encoding="utf-8")
    README_FILE.write_text(readme_text(README_FILE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE.relative_to(ROOT)} and the reference sections of README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
