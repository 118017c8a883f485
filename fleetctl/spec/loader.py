"""Loading spec files: render → parse → validate → check → expand, all errors at once."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from fleetctl.errors import UsageError
from fleetctl.spec.diagnostics import Diagnostic, FieldPath, Position, SpecError
from fleetctl.spec.expand import Fleet, expand, group_keys, merged
from fleetctl.spec.models import PATTERN_HINTS, FleetSpec
from fleetctl.spec.render import Chunk, referenced_names, render, split_documents, vars_block
from fleetctl.spec.yamlpos import Located, parse_document

#: Spec files larger than this are refused before reading.
MAX_SPEC_BYTES = 4 * 1024 * 1024
SPEC_SUFFIXES = (".yaml", ".yml")

_TYPE_MESSAGES = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}


def spec_files(paths: Iterable[str]) -> list[Path]:
    """The spec files named: files as given, directories as their `*.yaml` files, sorted."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix in SPEC_SUFFIXES and p.is_file())
            if not inside:
                raise UsageError(f"{raw}: directory holds no *.yaml spec files")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{raw}: no such spec file or directory")
    if not found:
        raise UsageError("no spec files given")
    return list(dict.fromkeys(found))


def load(paths: Sequence[str], variables: Mapping[str, Any] | None = None) -> list[Fleet]:
    """Load every fleet in the given files and directories.

    `variables` are the --var-file and --var overrides, already merged (flags last).
    Raises SpecError with every problem in every file, or UsageError for an
    override that no spec uses.
    """
    return _load_all([(path, _read(path)) for path in spec_files(paths)], variables)


def load_text(
    text: str | bytes, file: str = "<spec>", variables: Mapping[str, Any] | None = None
) -> list[Fleet]:
    """Load fleets from text; relative file sources resolve against the file's directory."""
    decoded = _decode(text, file) if isinstance(text, bytes) else text
    return _load_all([(Path(file), decoded)], variables)


def _load_all(
    sources: Sequence[tuple[Path, str | Diagnostic]], variables: Mapping[str, Any] | None
) -> list[Fleet]:
    overrides = dict(variables or {})
    problems: list[Diagnostic] = []
    documents: list[tuple[Path, Chunk]] = []
    for path, text in sources:
        chunks = split_documents(text) if isinstance(text, str) else []
        if isinstance(text, Diagnostic):
            problems.append(text)
        elif not chunks:
            problems.append(Diagnostic(str(path), Position(1, 1), (), "file holds no fleet spec"))
        documents.extend((path, chunk) for chunk in chunks)
    _check_overrides_used(overrides, [chunk for _, chunk in documents])
    fleets: list[tuple[Fleet, Located]] = []
    for path, chunk in documents:
        try:
            fleets.append(load_document(chunk, path, overrides))
        except SpecError as exc:
            problems.extend(exc.diagnostics)
    seen: dict[str, Fleet] = {}
    for fleet, located in fleets:
        if fleet.name in seen:
            problems.append(
                located.diagnostic(
                    ("name",), f"fleet '{fleet.name}' is also defined in {seen[fleet.name].source}"
                )
            )
        seen.setdefault(fleet.name, fleet)
    if problems:
        raise SpecError(problems)
    return [fleet for fleet, _ in fleets]


def load_document(chunk: Chunk, path: Path, overrides: Mapping[str, Any]) -> tuple[Fleet, Located]:
    """Render, parse, validate, check and expand one YAML document."""
    file = str(path)
    context = {**_var_defaults(chunk, file, overrides), **overrides}
    located = parse_document(
        render(chunk, context, file=file), file=file, line_offset=chunk.line_offset
    )
    if not isinstance(located.value, dict):
        raise SpecError(
            [
                located.diagnostic(
                    (), "a fleet spec must be a mapping (apiVersion, kind, name, sandboxes)"
                )
            ]
        )
    try:
        spec = FleetSpec.model_validate(located.value)
    except ValidationError as exc:
        raise SpecError(_diagnostic(located, error) for error in exc.errors()) from None
    problems = list(check(spec, located, path.parent))
    if problems:
        raise SpecError(problems)
    return expand(spec, path), located


BOTH_SOURCES = "give image or from_checkpoint, not both: a checkpoint has its own image"


def check(spec: FleetSpec, located: Located, spec_dir: Path) -> Iterable[Diagnostic]:
    """Rules that span fields: required-after-merge, uniqueness, files that must exist."""
    keys: dict[str, int] = {}
    if spec.defaults.image is not None and spec.defaults.from_checkpoint is not None:
        yield located.diagnostic(("defaults", "from_checkpoint"), BOTH_SOURCES)
    for g, group in enumerate(spec.sandboxes):
        here: FieldPath = ("sandboxes", g)
        settings = merged(spec.defaults, group)
        if settings["image"] is None and settings["from_checkpoint"] is None:
            yield located.diagnostic((*here, "name"), "no image: set image (or from_checkpoint) "
                                     "in this group or under defaults:")  # fmt: skip
        if group.image is not None and group.from_checkpoint is not None:
            yield located.diagnostic((*here, "from_checkpoint"), BOTH_SOURCES)
        idle, lifetime = settings["idle_timeout_minutes"], settings["timeout_minutes"]
        if idle is not None and idle > lifetime:
            owner = here if group.idle_timeout_minutes is not None else ("defaults",)
            message = f"idle_timeout_minutes ({idle}) cannot exceed timeout_minutes ({lifetime})"
            yield located.diagnostic((*owner, "idle_timeout_minutes"), message)
        for field, attribute in (("expose", "port"), ("expose", "name"), ("jobs", "name")):
            owner = here if getattr(group, field) is not None else ("defaults",)
            seen: set[object] = set()
            for i, item in enumerate(settings[field]):
                value = getattr(item, attribute)
                if value is not None and value in seen:
                    yield located.diagnostic(
                        (*owner, field, i, attribute),
                        f"{attribute} {value!r} appears twice in {field}",
                    )
                seen.add(value)
        owner = here if group.files is not None else ("defaults",)
        for i, item in enumerate(settings["files"]):
            if not (spec_dir / item.source).exists():
                yield located.diagnostic(
                    (*owner, "files", i, "source"),
                    f"source '{item.source}' does not exist (paths are relative to the spec file)",
                )
        for name in sorted(settings["env"].keys() & settings["secrets"].keys()):
            in_group = group.secrets is not None and name in group.secrets
            yield located.diagnostic(
                (*(here if in_group else ("defaults",)), "secrets", name),
                f"'{name}' is both an env variable and a secret",
                key=True,
            )
        for _, key in group_keys(group):
            if key in keys:
                yield located.diagnostic(
                    (*here, "name"),
                    f"sandbox key '{key}' is also produced by sandboxes[{keys[key]}]; "
                    "keys must be unique after replica expansion",
                )
            elif len(key) > 63:
                yield located.diagnostic(
                    (*here, "name"), f"sandbox key '{key}' is longer than 63 characters"
                )
            keys.setdefault(key, g)


def _diagnostic(located: Located, error: ErrorDetails) -> Diagnostic:
    loc: FieldPath = tuple(error["loc"])
    kind = error["type"]
    if loc and loc[-1] == "[key]":
        return located.diagnostic(loc[:-1], f"invalid key: {_message(error)}", key=True)
    if kind == "extra_forbidden":
        name = str(loc[-1])
        valid = _field_names(loc[:-1])
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid fields: {', '.join(valid)}"
        return located.diagnostic(loc, f"unknown field '{name}'{hint}", key=True)
    if kind == "missing":
        return Diagnostic(
            located.file, located.position(loc[:-1]), loc, f"missing required field '{loc[-1]}'"
        )
    return located.diagnostic(loc, _message(error))


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "string_pattern_mismatch":
        pattern = str((error.get("ctx") or {}).get("pattern", ""))
        if pattern in PATTERN_HINTS:
            return PATTERN_HINTS[pattern]
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind]
    message = error["msg"].removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _field_names(path: FieldPath) -> list[str]:
    """The keys valid at `path`, found by walking the model types along it."""
    annotation: Any = FleetSpec
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for n, f in annotation.model_fields.items() if (f.alias or n) == part), None
            )
            annotation = field.annotation if field else None
        else:
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or n for n, f in annotation.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def _var_defaults(chunk: Chunk, file: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    block = vars_block(chunk)
    if block is None:
        return {}
    located = parse_document(
        render(block, overrides, file=file), file=file, line_offset=block.line_offset
    )
    value = located.value.get("vars") if isinstance(located.value, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(
            [located.diagnostic(("vars",), "vars must be a mapping of names to values")]
        )
    return value


def _check_overrides_used(overrides: Mapping[str, Any], chunks: Sequence[Chunk]) -> None:
    known: set[str] = set()
    for chunk in chunks:
        known |= referenced_names(chunk)
    unused = sorted(set(overrides) - known)
    if unused:
        name = unused[0]
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"variable '{name}' is not used by any of the specs{hint}")


def _read(path: Path) -> str | Diagnostic:
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            return Diagnostic(
                str(path), Position(1, 1), (), f"spec file is larger than {MAX_SPEC_BYTES} bytes"
            )
        data = path.read_bytes()
    except OSError as exc:
        return Diagnostic(str(path), Position(1, 1), (), f"cannot read spec file: {exc.strerror}")
    return _decode(data, str(path))


def _decode(data: bytes, file: str) -> str | Diagnostic:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        return Diagnostic(file, Position(line, col), (), "spec file is not valid UTF-8")
    return text
