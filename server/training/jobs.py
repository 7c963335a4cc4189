"""Fine-tuning files, jobs, events and checkpoints, in the server's SQLite database.

The server process and the job worker process both open it (WAL mode): the worker appends
events and checkpoints and records its result; the server reads them and moves jobs through
their states. File blobs live under <data_dir>/files, job outputs under <data_dir>/jobs/<id>.

A file is written under a temporary name, fsynced and renamed before its row is inserted; a
delete removes the row before the blob. recover() (the server, at start) removes what a crash
between the two steps leaves, so listings and the disk agree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters.faults import disk_full_as_error, fault_point
from adapters.versions import fsync_path
from server.training.checkpoint import TEMP_PREFIX, list_checkpoints

logger = logging.getLogger(__name__)

DB_FILE = "loraplex.db"
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, num_examples INTEGER
);
CREATE TABLE IF NOT EXISTS ft_jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, model TEXT NOT NULL,
    method TEXT NOT NULL, hyperparameters TEXT NOT NULL, training_file TEXT NOT NULL,
    validation_file TEXT, suffix TEXT, seed INTEGER, status TEXT NOT NULL,
    finished_at INTEGER, fine_tuned_model TEXT, trained_tokens INTEGER, error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0, result TEXT
);
CREATE TABLE IF NOT EXISTS ft_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS ft_events_job ON ft_events (job_id, seq);
CREATE TABLE IF NOT EXISTS ft_checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL,
    fine_tuned_model_checkpoint TEXT
);
"""
# Columns added since a table was first created: (table, column, declaration).
_ADDED_COLUMNS = (("ft_checkpoints", "fine_tuned_model_checkpoint", "TEXT"),)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    num_examples: int | None


@dataclass
class Job:
    id: str
    created_at: int
    model: str
    method: str
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int | None
    status: str
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    result: dict[str, Any] | None = None


@dataclass
class Event:
    seq: int
    job_id: str
    created_at: int
    level: str
    type: str  # "message" | "metrics"
    message: str
    data: dict[str, Any] | None = None


@dataclass
class Checkpoint:
    id: str
    job_id: str
    created_at: int
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    fine_tuned_model_checkpoint: str | None = None  # its adapter's name, once published


class JobStore:
    """Files and jobs in SQLite, blobs on disk. Safe to share between threads."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.jobs_dir = self.data_dir / "jobs"
        for d in (self.files_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data_dir / DB_FILE, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        for table, column, declaration in _ADDED_COLUMNS:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock, self._db:
            return self._db.execute(sql, args).fetchall()

    def _page(
        self, table: str, where: dict[str, Any], after: str | None, limit: int, descending: bool
    ) -> tuple[list[tuple], bool]:
        """One page of rows by creation time, `after` naming the previous page's last id; and
        whether more rows follow. `where` maps SQL conditions to their one argument each."""
        direction, past = ("DESC", "<") if descending else ("ASC", ">")
        if after is not None:
            where = {**where, f"rowid {past} (SELECT rowid FROM {table} WHERE id = ?)": after}
        sql = f"SELECT * FROM {table} WHERE {' AND '.join(['1', *where])}"
        rows = self._run(
            f"{sql} ORDER BY created_at {direction}, rowid {direction} LIMIT ?",
            (*where.values(), limit + 1),
        )
        return rows[:limit], len(rows) > limit

    # ---- files ----------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def staging_path(self) -> Path:
        """A fresh temporary name in the files directory, for a blob being written."""
        return self.files_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"

    def add_file(
        self, filename: str, purpose: str, data: bytes, num_examples: int | None
    ) -> FileRecord:
        """Store a blob given whole (small files); uploads stream through commit_file."""
        tmp = self.staging_path()
        try:
            with disk_full_as_error("storing a file"), open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self.commit_file(tmp, filename, purpose, num_examples)
        finally:
            tmp.unlink(missing_ok=True)

    def commit_file(
        self, staged: Path, filename: str, purpose: str, num_examples: int | None
    ) -> FileRecord:
        """Rename a written, fsynced blob into place, then insert its row."""
        rec = FileRecord(
            new_id("file"),
            filename,
            purpose,
            staged.stat().st_size,
            int(time.time()),
            num_examples,
        )
        path = self.file_path(rec.id)
        with disk_full_as_error("storing a file"):
            fault_point("files.before_rename")
            staged.rename(path)
            try:
                fsync_path(self.files_dir)
                fault_point("files.before_index")
                self._run("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", _file_row(rec))
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return rec

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._run("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord(*rows[0]) if rows else None

    def list_files(
        self,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: str = "desc",
    ) -> tuple[list[FileRecord], bool]:
        """Files by upload time (`order` "asc" or "desc"); `after` is the id of the last file
        of the previous page. Returns the page and whether more follow."""
        where = {"purpose = ?": purpose} if purpose is not None else {}
        rows, more = self._page("files", where, after, limit, descending=order == "desc")
        return [FileRecord(*r) for r in rows], more

    def delete_file(self, file_id: str) -> bool:
        with self._lock, self._db:
            removed = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        fault_point("files.delete")
        self.file_path(file_id).unlink(missing_ok=True)
        return removed > 0

    def recover(self) -> list[Path]:
        """Remove what interrupted writes left (temporary files and directories, blobs
        without a row) and index complete checkpoints a crash left unrecorded. Call before
        uploads or workers start: their temporary files look the same."""
        removed: list[Path] = []
        ids = {row[0] for row in self._run("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.startswith(TEMP_PREFIX) or path.stem not in ids:
                _remove(path)
                removed.append(path)
        for file_id in sorted(ids):
            if not self.file_path(file_id).is_file():
                logger.warning("file %s is recorded but its blob is missing", file_id)
        for job_dir in self.jobs_dir.iterdir():
            for parent in (job_dir, job_dir / "checkpoints"):
                if parent.is_dir():
                    for path in parent.iterdir():
                        if path.name.startswith(TEMP_PREFIX):
                            _remove(path)
                            removed.append(path)
            self._reindex_checkpoints(job_dir.name, job_dir / "checkpoints")
        for path in removed:
            logger.warning("removed %s, left by an interrupted write", path.name)
        return removed

    def _reindex_checkpoints(self, job_id: str, root: Path) -> None:
        """Rows for the complete checkpoints on disk, and none for those gone."""
        self.prune_checkpoints(job_id)
        recorded = {Path(c.path) for c in self.checkpoints(job_id)}
        for info in list_checkpoints(root):
            if info.path not in recorded:
                metrics = {
                    "step": info.step,
                    "train_loss": info.train_loss,
                    "valid_loss": info.valid_loss,
                }
                self.add_checkpoint(job_id, info.step, metrics, str(info.path))

    # ---- jobs -----------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def add_job(self, job: Job) -> Job:
        self._run(
            "INSERT INTO ft_jobs (id, created_at, model, method, hyperparameters, training_file,"
            " validation_file, suffix, seed, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.created_at,
                job.model,
                job.method,
                json.dumps(job.hyperparameters),
                job.training_file,
                job.validation_file,
                job.suffix,
                job.seed,
                job.status,
            ),
        )
        return job

    def get_job(self, job_id: str) -> Job | None:
        rows = self._run("SELECT * FROM ft_jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        rows, more = self._page("ft_jobs", {}, after, limit, descending=True)
        return [_job(r) for r in rows], more

    def jobs_with_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        rows = self._run(
            f"SELECT * FROM ft_jobs WHERE status IN ({marks}) ORDER BY rowid", statuses
        )
        return [_job(r) for r in rows]

    def update_job(self, job_id: str, **fields: Any) -> None:
        encoded = {
            k: json.dumps(v) if k in ("error", "result") and v is not None else v
            for k, v in fields.items()
        }
        sets = ", ".join(f"{k} = ?" for k in encoded)
        self._run(f"UPDATE ft_jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))

    def add_trained_tokens(self, job_id: str, tokens: int) -> None:
        self._run(
            "UPDATE ft_jobs SET trained_tokens = COALESCE(trained_tokens, 0) + ? WHERE id = ?",
            (tokens, job_id),
        )

    def count_by_status(self) -> dict[str, int]:
        return dict(self._run("SELECT status, COUNT(*) FROM ft_jobs GROUP BY status"))

    def latest_metrics(self, job_id: str) -> dict[str, Any]:
        """The newest step's metrics event data, with the newest validation loss added."""
        newest = (
            "SELECT {} FROM ft_events WHERE job_id = ? AND type = 'metrics' AND {}"
            " ORDER BY seq DESC LIMIT 1"
        )
        rows = self._run(
            newest.format("data", "json_extract(data, '$.tokens_per_second') IS NOT NULL"),
            (job_id,),
        )
        latest = json.loads(rows[0][0]) if rows else {}
        rows = self._run(
            newest.format(
                "json_extract(data, '$.valid_loss')",
                "json_extract(data, '$.valid_loss') IS NOT NULL",
            ),
            (job_id,),
        )
        if rows:
            latest["valid_loss"] = rows[0][0]
        return latest

    def request_cancel(self, job_id: str) -> None:
        self._run("UPDATE ft_jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._run("SELECT cancel_requested FROM ft_jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0][0])

    # ---- events and checkpoints -----------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        self._run(
            "INSERT INTO ft_events (job_id, created_at, level, type, message, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                job_id,
                int(time.time()),
                level,
                type,
                message,
                json.dumps(data) if data is not None else None,
            ),
        )

    def events(
        self, job_id: str, after: int | None = None, limit: int = 20
    ) -> tuple[list[Event], bool]:
        """Newest first; `after` is the seq of the last event of the previous page."""
        rows = self._run(
            "SELECT * FROM ft_events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (job_id, after if after is not None else 2**62, limit + 1),
        )
        events = [
            Event(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None)
            for r in rows[:limit]
        ]
        return events, len(rows) > limit

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], path: str) -> None:
        self._run(
            "INSERT INTO ft_checkpoints (id, job_id, created_at, step, metrics, path)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (new_id("ftckpt"), job_id, int(time.time()), step, json.dumps(metrics), path),
        )

    def set_checkpoint_model(self, checkpoint_id: str, name: str) -> None:
        """Record the adapter name a checkpoint was published under."""
        self._run(
            "UPDATE ft_checkpoints SET fine_tuned_model_checkpoint = ? WHERE id = ?",
            (name, checkpoint_id),
        )

    def prune_checkpoints(self, job_id: str) -> None:
        """Forget checkpoints whose directories the trainer has removed (keep_checkpoints)."""
        for ckpt in self.checkpoints(job_id):
            if not Path(ckpt.path).exists():
                self._run("DELETE FROM ft_checkpoints WHERE id = ?", (ckpt.id,))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        rows = self._run(
            "SELECT * FROM ft_checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,)
        )
        return [Checkpoint(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows]


def _file_row(rec: FileRecord) -> tuple:
    return (rec.id, rec.filename, rec.purpose, rec.bytes, rec.created_at, rec.num_examples)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_JOB_FIELDS = [f.name for f in fields(Job)]  # the ft_jobs columns, in order


def _job(row: tuple) -> Job:
    values = dict(zip(_JOB_FIELDS, row, strict=True))
    for key in ("hyperparameters", "error", "result"):  # stored as JSON text
        values[key] = json.loads(values[key]) if values[key] else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)
