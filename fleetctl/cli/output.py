"""Everything the CLI shows: text, tables, JSON and YAML, NDJSON events, the progress bar,
summaries and structured logs.

Every string leaves through this module, and through `fleetctl.redact` on its way
(structlog through a processor of the same redactor), so no surface can show a
secret's value, whatever path brought it into a message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetctl.apply.events import FINISHING, Emit, Event, Kind
from fleetctl.apply.executor import Result
from fleetctl.plan import saved
from fleetctl.plan.model import Action, Plan
from fleetctl.plan.status import SandboxState
from fleetctl.redact import REDACTOR, redact
from fleetctl.sandboxes import Sandbox
from fleetctl.spec import Fleet


def echo(text: str, *, err: bool = False, nl: bool = True) -> None:
    typer.echo(redact(text), err=err, nl=nl)


def dump(data: Any, fmt: str) -> None:
    """`data` as indented JSON (`fmt` "json") or as YAML, on stdout."""
    data = redact(data)
    if fmt == "json":
        echo(json.dumps(data, indent=2))
    else:
        echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON in the file `path` (e.g. a saved plan)."""
    path.write_text(json.dumps(redact(data), indent=2) + "\n")


def table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None
) -> None:
    """A plain table (no borders, bold headers), wide enough not to fold URLs."""
    shown = Table(*columns, box=None, header_style="bold", title=title)
    for row in rows:
        shown.add_row(*redact(list(row)))
    Console(width=max(Console().width, 200)).print(shown)


def age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


# -- plans and apply runs ----------------------------------------------------------------


def plan(the_plan: Plan, fleets: list[Fleet], *, as_json: bool) -> None:
    """A plan: one line per change and the summary, or the saved-plan JSON."""
    if as_json:
        echo(json.dumps(saved.to_json(the_plan, fleets), indent=2))
        return
    for change in the_plan.changes:
        if change.action is not Action.noop:
            owner = change.after or change.before
            fleet = owner.fleet if owner else ""
            echo(f"  {change.action.symbol} {fleet}/{change.key:<24} {change.reason}")
    echo(the_plan.summary())


def summary(result: Result, stats: dict[str, int], *, as_json: bool) -> None:
    """What an apply did: counts per action, failures, and the requests it took."""
    if as_json:
        ndjson({"event": "summary", "changed": len(result.done), "failed": len(result.failed),
                "seconds": round(result.elapsed, 2), **stats})  # fmt: skip
        return
    rows = [(f"{a.symbol} {a.value}", str(n)) for a in Action
            if (n := sum(1 for done in result.done.values() if done == a.value))]  # fmt: skip
    table(("ACTION", "DONE"), [*rows, ("failed", str(len(result.failed)))], title="Applied")
    counts = {name: stats.get(name, 0) for name in ("requests", "retries", "throttled")}
    echo(f"in {result.elapsed:.1f}s: {counts['requests']} requests, {counts['retries']} "
         f"retries, {counts['throttled']} throttled (429)")  # fmt: skip
    for key, error in result.failed.items():
        echo(f"failed: {key}: {error}", err=True)


def fleet_states(states: Sequence[SandboxState]) -> None:
    rows = []
    for state in states:
        shown_age = "" if state.age_seconds is None else age(timedelta(seconds=state.age_seconds))
        jobs = " ".join(f"{j.name}:{j.state}" + (f"({j.exit_code})" if j.exit_code else "")
                        for j in state.jobs)  # fmt: skip
        rows.append((f"{state.fleet}/{state.key}", state.id or "-", state.status, shown_age,
                     " ".join(state.exposures), jobs))  # fmt: skip
    table(("SANDBOX", "ID", "STATUS", "AGE", "EXPOSED", "JOBS"), rows)


def sandboxes(found: Sequence[Sandbox]) -> None:
    now = datetime.now(UTC)
    rows = [(s.id, s.name, s.status, age(now - s.created_at), ",".join(s.labels)) for s in found]
    table(("ID", "NAME", "STATUS", "AGE", "LABELS"), rows)


# -- the event stream ---------------------------------------------------------------------


def ndjson(event: Event) -> None:
    """One JSON object a line, flushed at once (pipelines read events as they come)."""
    print(json.dumps(redact(event)), flush=True)


@contextlib.contextmanager
def progress(total: int) -> Iterator[Emit]:
    """One line per event; on a terminal, with a live progress bar of the planned changes."""
    console = Console()
    if not console.is_terminal:
        yield lambda event: echo(_line(event))
        return
    bar = Progress(TextColumn("applying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)  # fmt: skip
    task = bar.add_task("apply", total=total)
    finished: set[str] = set()
    with bar:

        def show(event: Event) -> None:
            bar.console.print(redact(_line(event)), highlight=False, markup=False)
            key = str(event.get("key"))
            if event["event"] in FINISHING and key not in finished:
                finished.add(key)
                bar.advance(task)

        yield show


@contextlib.contextmanager
def apply_events(total: int, *, as_json: bool) -> Iterator[Emit]:
    """Where an apply's events go: NDJSON, or text lines (with a progress bar of the
    `total` planned changes on a terminal); and always the structured log."""
    if as_json:
        yield fan_out(ndjson, log_event)
        return
    with progress(total) as show:
        yield fan_out(show, log_event)


def fan_out(*subscribers: Emit) -> Emit:
    def emit(event: Event) -> None:
        for subscriber in subscribers:
            subscriber(event)

    return emit


def _line(event: Event) -> str:
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "key"))
    return f"{event['event']:>12} {event.get('key', '')} {details}".rstrip()


# -- structured logs ----------------------------------------------------------------------


def configure_logging(log_format: Literal["console", "json"], verbose: int) -> None:
    """structlog to stderr: warnings by default, info with -v, debug with -vv; redacted."""
    level = logging.WARNING - 10 * min(verbose, 2)
    renderer: Callable[..., Any] = (
        structlog.processors.JSONRenderer() if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )  # fmt: skip
    structlog.configure(
        processors=[REDACTOR.processor, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )  # fmt: skip


def log_event(event: Event) -> None:
    fields = {k: v for k, v in event.items() if k != "event"}
    logger = structlog.get_logger("fleetctl.apply")
    if event["event"] == Kind.FAILED:
        logger.warning(event["event"], **fields)
    else:
        logger.info(event["event"], **fields)
