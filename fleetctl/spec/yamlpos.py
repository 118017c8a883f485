"""YAML parsing that remembers where every node came from.

PyYAML's composer gives nodes with marks; we build plain Python values from them
ourselves so that (a) every value and key keeps its line and column, (b) a
duplicate key is an error instead of silently winning, and (c) alias bombs are
cut off by a node budget instead of exhausting memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from fleetctl.spec.diagnostics import Diagnostic, FieldPath, Position, SpecError

#: Upper bound on nodes built per document, aliases counted each time they expand.
MAX_NODES = 200_000


@dataclass(slots=True)
class Located:
    """A parsed document and where each of its parts stands in the file."""

    value: Any
    file: str
    values: dict[FieldPath, Position] = field(default_factory=dict)
    keys: dict[FieldPath, Position] = field(default_factory=dict)

    def position(self, path: FieldPath, *, key: bool = False) -> Position:
        """Position of `path` (its key when `key`), else of its nearest known ancestor."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            found = table.get(prefix) or self.values.get(prefix)
            if found is not None:
                return found
        return Position(1, 1)

    def diagnostic(self, path: FieldPath, message: str, *, key: bool = False) -> Diagnostic:
        return Diagnostic(self.file, self.position(path, key=key), path, message)


def mark_position(mark: yaml.Mark | None, line_offset: int) -> Position:
    if mark is None:
        return Position(line_offset + 1, 1)
    return Position(mark.line + 1 + line_offset, mark.column + 1)


def parse_document(text: str, *, file: str, line_offset: int = 0) -> Located:
    """Parse one YAML document; an empty document gives `None`.

    Raises SpecError for syntax errors (with the parser's position), duplicate
    keys, non-string keys, unknown tags and documents past the node budget.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(
            [Diagnostic(file, mark_position(mark, line_offset), (), f"invalid YAML: {problem}")]
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(
            [Diagnostic(file, Position(line_offset + 1, 1), (), f"invalid YAML: {exc}")]
        ) from None
    except RecursionError:
        raise SpecError(
            [Diagnostic(file, Position(line_offset + 1, 1), (), "YAML nesting is too deep")]
        ) from None
    located = Located(value=None, file=file)
    if node is None:
        return located
    builder = _Builder(located, line_offset)
    try:
        located.value = builder.build(node, ())
    except RecursionError:
        builder.problems.append(located.diagnostic((), "YAML nesting is too deep"))
    if builder.problems:
        raise SpecError(builder.problems)
    return located


class _BudgetExceeded(Exception):
    pass


class _Builder:
    def __init__(self, located: Located, line_offset: int) -> None:
        self.located = located
        self.line_offset = line_offset
        self.constructor = SafeConstructor()
        self.budget = MAX_NODES
        self.problems: list[Diagnostic] = []

    def at(self, node: yaml.Node) -> Position:
        return mark_position(node.start_mark, self.line_offset)

    def problem(self, node: yaml.Node, path: FieldPath, message: str) -> None:
        self.problems.append(Diagnostic(self.located.file, self.at(node), path, message))

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        self.budget -= 1
        if self.budget == 0:
            self.problem(node, path, f"document too large (more than {MAX_NODES} nodes)")
        if self.budget <= 0:
            return None
        self.located.values.setdefault(path, self.at(node))
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def mapping(self, node: yaml.MappingNode, path: FieldPath) -> dict[str, Any]:
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            self.problem(node, path, f"invalid merge key: {exc.problem}")
            return {}
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.problem(key_node, path, "mapping keys must be strings")
                continue
            child = (*path, key)
            if key in out:
                first = self.located.keys[child]
                self.problem(
                    key_node, child, f"duplicate key '{key}' (first defined at line {first.line})"
                )
                continue
            self.located.keys[child] = self.at(key_node)
            out[key] = self.build(value_node, child)
        return out

    def scalar(self, node: yaml.Node, path: FieldPath) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.problem(node, path, f"invalid value: {exc.problem}")
        except (ValueError, TypeError, OverflowError) as exc:
            self.problem(node, path, f"invalid value: {exc}")
        return None
