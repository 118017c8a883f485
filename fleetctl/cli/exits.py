"""Exit codes, decided here and nowhere else.

Commands end in one of three ways: they return (0), they raise an `Outcome`
(how a command ended when that is not plain success, not an error), or an error
reaches `fleetctl.cli.main`. `exit_code` maps each to its code with `EXIT_CODES`.
"""

from __future__ import annotations

import typer

from fleetctl.errors import FleetError
from fleetctl.sandboxes import APIError, CommandTimeoutError, SandboxNotRunningError


class Outcome(Exception):
    """A command's ending that is not success; `str(self)`, when not empty, is shown."""


class ChangesPresent(Outcome):
    """`plan --detailed-exitcode` found changes."""


class PartialFailure(Outcome):
    """Some sandboxes (or jobs) failed; the rest converged."""


class Interrupted(Outcome):
    """Ctrl-C: work in flight was cancelled."""


class NotFound(Outcome):
    """A question answered no (e.g. `server status` with no server running)."""


class CommandExited(Outcome):
    """`exec` ends with the exit code of the command it ran."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code


#: Exit codes by class, most specific first.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ChangesPresent, 2),
    (PartialFailure, 3),
    (Interrupted, 130),
    (KeyboardInterrupt, 130),
    (typer.Abort, 130),
    (NotFound, 1),
    (FleetError, 1),
    (APIError, 1),
    (SandboxNotRunningError, 1),
    (CommandTimeoutError, 1),
    (OSError, 1),  # a file the command writes or reads: full disk, no permission
    # click's usage errors (typer vendors click): 1, not click's 2, which here means
    # "changes present" to a pipeline running `plan --detailed-exitcode`
    (typer.TyperException, 1),
)

#: What the codes mean, for --help and the README.
MEANINGS = (
    "0 success (plan --detailed-exitcode: no changes)",
    "1 error (invalid spec, usage, API, a sandbox not running)",
    "2 changes present (plan --detailed-exitcode)",
    "3 partial failure (some sandboxes or jobs failed, the rest converged)",
    "130 interrupted or not confirmed",
    "exec: the command's own exit code",
)


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that raised `exc`."""
    if isinstance(exc, CommandExited):
        return exc.code
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    raise exc
