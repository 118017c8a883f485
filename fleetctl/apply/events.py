"""Subscribers to the executor's event stream: text lines, NDJSON, a live progress bar
on a terminal, and structured logs. The executor only emits; these decide what shows."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Event = dict[str, Any]
Emit = Callable[[Event], None]
#: Events that finish one planned change (for the progress bar).
FINISHING = frozenset({"ready", "deleted", "failed", "updated"})


def configure_logging(log_format: str, verbose: int) -> None:
    """structlog to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.WARNING - 10 * min(verbose, 2)
    renderer: Any = (
        structlog.processors.JSONRenderer() if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )  # fmt: skip
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )  # fmt: skip


def log_event(event: Event) -> None:
    fields = {k: v for k, v in event.items() if k != "event"}
    logger = structlog.get_logger("fleetctl.apply")
    if event["event"] == "failed":
        logger.warning(event["event"], **fields)
    else:
        logger.info(event["event"], **fields)


def ndjson(event: Event) -> None:
    print(json.dumps(event), flush=True)


@contextmanager
def text_output(total: int) -> Iterator[Emit]:
    """One line per event; on a terminal, with a live progress bar under them."""
    console = Console()
    if not console.is_terminal:
        yield lambda event: print(_line(event), flush=True)
        return
    progress = Progress(TextColumn("applying"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)  # fmt: skip
    task = progress.add_task("apply", total=total)
    with progress:

        def show(event: Event) -> None:
            progress.console.print(_line(event), highlight=False)
            if event["event"] in FINISHING:
                progress.advance(task)

        yield show


def fan_out(*subscribers: Emit) -> Emit:
    def emit(event: Event) -> None:
        for subscriber in subscribers:
            subscriber(event)

    return emit


def _line(event: Event) -> str:
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "key"))
    return f"{event['event']:>12} {event.get('key', '')} {details}".rstrip()
