"""Jinja2 rendering of spec documents, before any YAML is parsed.

Rendering runs in Jinja's sandboxed environment with StrictUndefined, so a spec
can compute but not reach into Python, and a missing variable is an error that
names it and its line. Templates see the document's `vars:` defaults, overridden
by `--var-file` files and then `--var k=v` flags, plus `env(NAME, default)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import jinja2
import jinja2.meta
import yaml
from jinja2.sandbox import SandboxedEnvironment

from fleetctl.errors import UsageError
from fleetctl.spec.diagnostics import Diagnostic, Position, SpecError

#: Rendered text larger than this is refused: a spec is not a place for data.
MAX_RENDERED_BYTES = 8 * 1024 * 1024

_TEMPLATE_FILE = "<fleetctl-spec>"
_UNDEFINED = re.compile(r"^'([^']+)' is undefined$")
_DOC_MARKER = re.compile(r"^---(?:[ \t].*)?$")
_VARS_KEY = re.compile(r"^vars[ \t]*:")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One YAML document's source text and the line it starts on (0-based offset)."""

    text: str
    line_offset: int


class _MissingEnv(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _env(name: str, default: Any = _UNSET) -> Any:
    """`env("NAME", default)` for templates: the environment variable, else the default."""
    value = os.environ.get(name)
    if value is not None:
        return value
    if default is _UNSET:
        raise _MissingEnv(name)
    return default


def _environment() -> SandboxedEnvironment:
    environment = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    environment.globals["env"] = _env
    return environment


_ENVIRONMENT = _environment()


def split_documents(text: str) -> list[Chunk]:
    """Split a file at `---` lines, keeping each document's line offset.

    Splitting happens before rendering because each document has its own `vars:`.
    """
    chunks: list[Chunk] = []
    start = 0
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if _DOC_MARKER.match(line.rstrip("\r\n")):
            chunks.append(Chunk("".join(lines[start:number]), start))
            # keep the marker line's place so line numbers stay those of the file
            start = number + 1
    chunks.append(Chunk("".join(lines[start:]), start))
    return [c for c in chunks if any(_is_content(line) for line in c.text.splitlines())]


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def vars_block(chunk: Chunk) -> Chunk | None:
    """The top-level `vars:` entry of a document, as its own chunk, if present."""
    lines = chunk.text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if not _VARS_KEY.match(line):
            continue
        end = number + 1
        while end < len(lines) and (
            not lines[end].strip() or lines[end][0] in " \t#" or lines[end].startswith("{#")
        ):
            end += 1
        return Chunk("".join(lines[number:end]), chunk.line_offset + number)
    return None


def referenced_names(chunk: Chunk) -> set[str]:
    """Names a document's template reads from its context (empty if it does not parse)."""
    try:
        return set(jinja2.meta.find_undeclared_variables(_ENVIRONMENT.parse(chunk.text)))
    except jinja2.TemplateSyntaxError:
        return set()


def render(chunk: Chunk, variables: Mapping[str, Any], *, file: str) -> str:
    """Render one document; raises SpecError naming the line of any template problem."""
    try:
        template = _ENVIRONMENT.from_string(chunk.text)
        template.filename = _TEMPLATE_FILE
        return "".join(_guarded(template.generate(dict(variables))))
    except jinja2.TemplateSyntaxError as exc:
        line = exc.lineno
        raise _template_error(chunk, file, line, f"template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        message = exc.message or "undefined value"
        match = _UNDEFINED.match(message)
        name = match.group(1) if match else None
        text = (
            f"undefined variable '{name}': give it a default under vars:, or pass "
            f"--var {name}=VALUE or --var-file"
            if name
            else f"undefined value: {message}"
        )
        raise _template_error(chunk, file, _line_of(exc.__traceback__), text, name) from None
    except _MissingEnv as exc:
        text = f"environment variable '{exc.name}' is not set and env() was given no default"
        raise _template_error(chunk, file, _line_of(exc.__traceback__), text, exc.name) from None
    except _TooLarge:
        raise _template_error(
            chunk, file, None, f"rendered document exceeds {MAX_RENDERED_BYTES} bytes"
        ) from None
    except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, RecursionError) as exc:
        text = f"template error: {exc}"
        raise _template_error(chunk, file, _line_of(exc.__traceback__), text) from None


class _TooLarge(Exception):
    pass


def _guarded(parts: Iterator[str]) -> Iterator[str]:
    size = 0
    for part in parts:
        size += len(part)
        if size > MAX_RENDERED_BYTES:
            raise _TooLarge
        yield part


def _line_of(tb: TracebackType | None) -> int | None:
    """The template line a render error was raised from, via Jinja's rewritten traceback."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _template_error(
    chunk: Chunk, file: str, line: int | None, message: str, needle: str | None = None
) -> SpecError:
    lines = chunk.text.splitlines()
    line = line if line is not None and 1 <= line <= max(len(lines), 1) else 1
    col = 1
    if needle and line <= len(lines):
        found = lines[line - 1].find(needle)
        col = found + 1 if found >= 0 else 1
    return SpecError([Diagnostic(file, Position(chunk.line_offset + line, col), (), message)])


def parse_var(assignment: str) -> tuple[str, Any]:
    """Parse a `--var NAME=VALUE` flag; the value is typed as a YAML scalar (3 → int)."""
    name, sep, raw = assignment.partition("=")
    name = name.strip()
    if not sep or not _VAR_NAME.match(name):
        raise UsageError(
            f"--var expects NAME=VALUE with NAME a plain identifier, got '{assignment}'"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict | list):
        raise UsageError(
            f"--var {name}: structured values (lists, mappings) go in a --var-file, "
            "not on the command line"
        )
    return name, value


def load_var_file(path: str) -> dict[str, Any]:
    """Read a `--var-file`: a YAML mapping of variable names to values."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise UsageError(f"--var-file {path}: cannot read it ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"--var-file {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and _VAR_NAME.match(k) for k in data
    ):
        raise UsageError(f"--var-file {path}: expected a mapping of variable names to values")
    return data
