"""SQLite state of the local server: sandboxes, exposures, idempotency keys.

One connection, WAL journal, guarded by a lock: every statement is short, and
the server runs one process. Secret values are never written here; a sandbox's
secrets live only in its own processes' environment.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetctl.contract import FINAL_STATUSES

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    labels TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    started_at TEXT,
    terminated_at TEXT,
    deleted_at TEXT,
    exit_code INTEGER,
    error_type TEXT,
    error_message TEXT,
    termination_reason TEXT,
    image_source TEXT,
    runtime TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_seq ON sandboxes (seq);
CREATE TABLE IF NOT EXISTS exposures (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    name TEXT,
    protocol TEXT NOT NULL,
    listen_port INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    parent_id TEXT,
    depth INTEGER NOT NULL,
    state TEXT NOT NULL,
    docker_image TEXT NOT NULL,
    disk_size_gb REAL NOT NULL,
    layer TEXT,
    stored_bytes INTEGER,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    sandbox_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    started_at TEXT NOT NULL,
    exit_code INTEGER,
    finished_at TEXT,
    PRIMARY KEY (sandbox_id, job_id)
);
"""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    """A sandbox row. `request` holds the create request without its secrets."""

    id: str
    seq: int
    name: str
    status: str
    request: dict[str, Any]
    labels: tuple[str, ...]
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    terminated_at: datetime | None = None
    deleted_at: datetime | None = None
    exit_code: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    termination_reason: str | None = None
    image_source: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExposureRecord:
    id: str
    sandbox_id: str
    port: int
    name: str | None
    protocol: str
    listen_port: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint: a sandbox's writable layer and workspace, frozen. `layer` is the
    runtime's (JSON); `parent_id` the checkpoint its sandbox was created from."""

    id: str
    sandbox_id: str
    parent_id: str | None
    depth: int
    state: str  # PENDING, DURABLE or FAILED
    docker_image: str
    disk_size_gb: float
    layer: dict[str, Any] | None
    stored_bytes: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A background job the server started: once per (sandbox, job id), ever."""

    sandbox_id: str
    job_id: str
    started_at: datetime
    exit_code: int | None = None
    finished_at: datetime | None = None


_DATES = ("created_at", "updated_at", "started_at", "terminated_at", "deleted_at")
_JSON = ("request", "runtime")


class Store:
    """Sandbox and exposure records in `<data dir>/state.db`."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self.checkpoints = CheckpointStore(self)
        self.jobs = JobStore(self)
        # 0600 before SQLite opens it: its -wal and -shm files take the same mode,
        # and environment variables are stored here
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def insert(self, record: SandboxRecord) -> SandboxRecord:
        """Insert a new sandbox; if its idempotency key exists, return that sandbox instead."""
        with self._tx() as db:
            if record.idempotency_key is not None:
                row = db.execute(
                    "SELECT * FROM sandboxes WHERE idempotency_key = ?", (record.idempotency_key,)
                ).fetchone()
                if row is not None:
                    return _record(row)
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM sandboxes").fetchone()[0]
            record = replace(record, seq=seq)
            values = _row(record)
            columns, marks = ", ".join(values), ", ".join("?" * len(values))
            db.execute(
                f"INSERT INTO sandboxes ({columns}) VALUES ({marks})", tuple(values.values())
            )
        return record

    def update(self, sandbox_id: str, **changes: Any) -> SandboxRecord | None:
        """Apply `changes` (field=value) and bump updated_at; None if the id is unknown."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            if row is None:
                return None
            record = replace(_record(row), updated_at=utcnow(), **changes)
            values = _row(record)
            db.execute(
                f"UPDATE sandboxes SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                (*values.values(), sandbox_id),
            )
        return record

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return _record(row) if row else None

    def query(
        self,
        *,
        labels: Sequence[str] = (),
        status: str | None = None,
        active_only: bool = False,
        include_deleted: bool = False,
        offset: int = 0,
        limit: int | None = None,
    ) -> tuple[list[SandboxRecord], int]:
        """Sandboxes newest first having every label in `labels`, and the total count."""
        where: list[str] = ["1 = 1"]
        args: list[object] = []
        if not include_deleted:
            where.append("deleted_at IS NULL")
        if status:
            where.append("status = ?")
            args.append(status)
        if active_only:
            where.append(f"status NOT IN ({', '.join('?' * len(FINAL_STATUSES))})")
            args += sorted(FINAL_STATUSES)
        for label in dict.fromkeys(labels):
            where.append("EXISTS (SELECT 1 FROM json_each(sandboxes.labels) WHERE value = ?)")
            args.append(label)
        clause = " AND ".join(where)
        with self._lock:
            total = self._db.execute(
                f"SELECT COUNT(*) FROM sandboxes WHERE {clause}", args
            ).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM sandboxes WHERE {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*args, -1 if limit is None else limit, offset),
            ).fetchall()
        return [_record(r) for r in rows], total

    def purge(self, sandbox_id: str) -> None:
        """Forget a sandbox entirely (its exposures too)."""
        with self._tx() as db:
            db.execute("DELETE FROM exposures WHERE sandbox_id = ?", (sandbox_id,))
            db.execute("DELETE FROM jobs WHERE sandbox_id = ?", (sandbox_id,))
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def add_exposure(self, exposure: ExposureRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO exposures VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    exposure.id,
                    exposure.sandbox_id,
                    exposure.port,
                    exposure.name,
                    exposure.protocol,
                    exposure.listen_port,
                    exposure.created_at.isoformat(),
                ),
            )

    def exposures(self, sandbox_id: str | None = None) -> list[ExposureRecord]:
        sql, args = "SELECT * FROM exposures", []
        if sandbox_id is not None:
            sql, args = sql + " WHERE sandbox_id = ?", [sandbox_id]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at", args).fetchall()
        return [
            ExposureRecord(
                r["id"],
                r["sandbox_id"],
                r["port"],
                r["name"],
                r["protocol"],
                r["listen_port"],
                datetime.fromisoformat(r["created_at"]),
            )
            for r in rows
        ]

    def remove_exposure(self, exposure_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM exposures WHERE id = ?", (exposure_id,))


class CheckpointStore:
    """Checkpoint records, in the same database as the sandboxes."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, record: CheckpointRecord) -> None:
        values = _checkpoint_row(record)
        columns, marks = ", ".join(values), ", ".join("?" * len(values))
        with self._store._tx() as db:
            db.execute(f"INSERT INTO checkpoints ({columns}) VALUES ({marks})",
                       tuple(values.values()))  # fmt: skip

    def update(self, checkpoint_id: str, **changes: Any) -> None:
        found = self.get(checkpoint_id)
        if found is None:
            return
        values = _checkpoint_row(replace(found, updated_at=utcnow(), **changes))
        with self._store._tx() as db:
            db.execute(f"UPDATE checkpoints SET {', '.join(f'{k} = ?' for k in values)} "
                       "WHERE id = ?", (*values.values(), checkpoint_id))  # fmt: skip

    def get(self, checkpoint_id: str) -> CheckpointRecord | None:
        found = self._select("WHERE id = ?", checkpoint_id)
        return found[0] if found else None

    def of(self, sandbox_id: str) -> list[CheckpointRecord]:
        """A sandbox's checkpoints, oldest first."""
        return self._select("WHERE sandbox_id = ? ORDER BY created_at", sandbox_id)

    def children(self, checkpoint_id: str) -> list[CheckpointRecord]:
        return self._select("WHERE parent_id = ?", checkpoint_id)

    def chain(self, checkpoint_id: str) -> list[CheckpointRecord]:
        """The checkpoint and those it was made on top of, oldest first."""
        found: list[CheckpointRecord] = []
        current = self.get(checkpoint_id)
        while current is not None:
            found.insert(0, current)
            current = self.get(current.parent_id) if current.parent_id else None
        return found

    def remove(self, checkpoint_id: str) -> None:
        with self._store._tx() as db:
            db.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint_id,))

    def _select(self, where: str, *args: object) -> list[CheckpointRecord]:
        with self._store._lock:
            rows = self._store._db.execute(f"SELECT * FROM checkpoints {where}", args).fetchall()
        records = []
        for row in rows:
            values: dict[str, Any] = dict(row)
            values["layer"] = json.loads(values["layer"]) if values["layer"] else None
            for name in ("created_at", "updated_at"):
                values[name] = datetime.fromisoformat(values[name])
            records.append(CheckpointRecord(**values))
        return records


class JobStore:
    """Background job records, in the same database as the sandboxes."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def claim(self, sandbox_id: str, job_id: str) -> bool:
        """Record that the job starts now; False when it was started before (then it
        must not start again)."""
        with self._store._tx() as db:
            row = (sandbox_id, job_id, utcnow().isoformat())
            done = db.execute("INSERT OR IGNORE INTO jobs (sandbox_id, job_id, started_at) "
                              "VALUES (?, ?, ?)", row)  # fmt: skip
            return done.rowcount == 1

    def finish(self, sandbox_id: str, job_id: str, exit_code: int) -> None:
        with self._store._tx() as db:
            row = (exit_code, utcnow().isoformat(), sandbox_id, job_id)
            db.execute("UPDATE jobs SET exit_code = ?, finished_at = ? WHERE sandbox_id = ? "
                       "AND job_id = ?", row)  # fmt: skip

    def of(self, sandbox_id: str) -> list[JobRecord]:
        """A sandbox's jobs, in the order they started."""
        with self._store._lock:
            rows = self._store._db.execute("SELECT * FROM jobs WHERE sandbox_id = ? ORDER BY "
                                           "started_at", (sandbox_id,)).fetchall()  # fmt: skip
        return [
            JobRecord(
                row["sandbox_id"],
                row["job_id"],
                datetime.fromisoformat(row["started_at"]),
                row["exit_code"],
                row["finished_at"] and datetime.fromisoformat(row["finished_at"]),
            )
            for row in rows
        ]


def _checkpoint_row(record: CheckpointRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in CheckpointRecord.__slots__}
    values["layer"] = json.dumps(record.layer) if record.layer is not None else None
    for name in ("created_at", "updated_at"):
        values[name] = values[name].isoformat()
    return values


def _row(record: SandboxRecord) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in SandboxRecord.__slots__:
        value = getattr(record, name)
        if name in _DATES:
            value = value.isoformat() if value is not None else None
        elif name in _JSON:
            value = json.dumps(value)
        elif name == "labels":
            value = json.dumps(list(value))
        values[name] = value
    return values


def _record(row: sqlite3.Row) -> SandboxRecord:
    values: dict[str, Any] = dict(row)
    for name in _DATES:
        values[name] = datetime.fromisoformat(values[name]) if values[name] else None
    for name in _JSON:
        values[name] = json.loads(values[name]) if values[name] else {}
    values["labels"] = tuple(json.loads(values["labels"]))
    return SandboxRecord(**values)
