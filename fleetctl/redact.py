"""Redaction: the one step every output of fleetctl passes through.

A secret's value enters the process in one place, when a spec's secret reference
is resolved (`fleetctl.plan.secrets.resolve`), and that place hands it to
`REDACTOR` with the placeholder it is shown as (`<secret:from_env:NAME>`).
Everything fleetctl shows — command output, tables, NDJSON events, saved plans,
error messages, structured logs — goes through `redact` (the CLI's output module
and a structlog processor call it), so a secret that reaches a message by any
path, say an API error that echoes a request, is shown by its source, never its
value.

Values shorter than `MIN_LENGTH` are not redacted: replacing every "1" or "no"
in the output would garble it while protecting nothing.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any, TypeVar

T = TypeVar("T")
MIN_LENGTH = 4


class Redactor:
    """Replaces known secret values with their placeholders, in text and in nested data."""

    def __init__(self) -> None:
        self._placeholders: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str, placeholder: str) -> None:
        """From now on, show `value` as `placeholder` wherever it appears."""
        if len(value) < MIN_LENGTH or self._placeholders.get(value) == placeholder:
            return
        with self._lock:
            self._placeholders[value] = placeholder
            # longest first, so a secret containing another is replaced whole
            ordered = sorted(self._placeholders, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        with self._lock:
            self._placeholders.clear()
            self._pattern = None

    def text(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            return text
        return pattern.sub(lambda match: self._placeholders[match.group(0)], text)

    def value(self, data: T) -> T:
        """`data` with every string inside it (dict keys and values, list items) redacted."""
        if self._pattern is None:
            return data
        return self._walk(data)  # type: ignore[no-any-return]

    def _walk(self, data: Any) -> Any:
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, Mapping):
            return {self._walk(k): self._walk(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return type(data)(self._walk(item) for item in data)
        return data

    def processor(
        self, _logger: object, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: the event dict, redacted."""
        return self.value(dict(event))


#: The process's redactor: secrets are added where they are resolved.
REDACTOR = Redactor()
redact = REDACTOR.value
