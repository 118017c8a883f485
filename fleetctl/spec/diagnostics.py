"""Positions and diagnostics: every spec problem points at file:line:col and a field path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fleetctl.errors import FleetError

#: A field path inside a document: ("sandboxes", 1, "expose", 0, "port").
FieldPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A 1-based line and column in a file."""

    line: int
    col: int


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in a spec file.

    `message` is written for the user and must never contain a secret value:
    validation errors are built from rule descriptions, never from the input.
    """

    file: str
    position: Position
    path: FieldPath
    message: str

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.file, self.position.line, self.position.col, self.message)

    def __str__(self) -> str:
        where = f"{self.file}:{self.position.line}:{self.position.col}"
        field = format_path(self.path)
        return f"{where}: {field}: {self.message}" if field else f"{where}: {self.message}"


def format_path(path: FieldPath) -> str:
    """Render a field path the way users write it: `sandboxes[1].expose[0].port`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class SpecError(FleetError):
    """One or more spec problems, sorted by file and position, reported all at once."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = sorted(set(diagnostics), key=Diagnostic.sort_key)
        if not self.diagnostics:
            raise ValueError("SpecError needs at least one diagnostic")
        count = len(self.diagnostics)
        head = "1 problem" if count == 1 else f"{count} problems"
        super().__init__(f"{head} in spec:\n" + "\n".join(f"  {d}" for d in self.diagnostics))
