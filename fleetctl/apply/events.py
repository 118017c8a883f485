"""The executor's event stream: what each event means, defined once.

The executor only emits; subscribers (the CLI's text lines, NDJSON, progress bar
and structured logs, in `fleetctl.cli.output`) decide what shows. An event is a
JSON-ready dict: {"event": <Kind>, "key": <sandbox key>, ...fields}.

Every planned change ends with exactly one `done` or `failed` event for its key
(a change that finished can still fail later, while `--wait-jobs` waits for its
jobs: then `failed` follows its `done`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

Event = dict[str, Any]
Emit = Callable[[Event], None]


class Kind(StrEnum):
    PREPARING = "preparing"  # id, command: a group's setup runs (key: "<group> (prepare)")
    PREPARED = "prepared"  # checkpoint, reused
    RELEASED = "released"  # a setup checkpoint no sandbox uses was deleted (key: its id)
    CREATED = "created"  # id
    READY = "ready"  # id
    DELETED = "deleted"  # id, reason
    UNEXPOSED = "unexposed"  # exposure
    EXPOSED = "exposed"  # port, url
    UPLOADED = "uploaded"  # source, target
    JOB_STARTED = "job-started"  # job
    JOB_FINISHED = "job-finished"  # job, exit_code
    ARTIFACT = "artifact"  # path
    DONE = "done"  # action: the planned change is complete
    FAILED = "failed"  # action, error


#: Events that end a planned change (for progress displays).
FINISHING = frozenset({Kind.DONE, Kind.FAILED})


def event(kind: Kind, key: str, **fields: Any) -> Event:
    return {"event": kind.value, "key": key, **fields}
