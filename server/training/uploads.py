"""One file upload on its way into the file store, in bounded memory.

The bytes go to a temporary file in the data dir as they arrive, their lines are checked as
training JSONL on the way, and the size is held to --max-file-mb and the data dir to
--data-quota-mb. Nothing is kept in memory but the line being read; a refused or failed upload
removes its temporary file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO

from adapters.faults import disk_full_as_error, fault_point
from server.training.data import JsonlValidator
from server.training.jobs import FileRecord, JobStore

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 4 << 20  # a training example longer than this is refused, not held
QUOTA_CHECK_BYTES = 4 << 20  # the data dir is measured again after this much is written
MEASURED_DIRS = ("files", "adapters", "jobs")  # what --data-quota-mb counts
_commit_lock = threading.Lock()  # one quota check and rename at a time


class UploadRefusedError(Exception):
    """An upload the server will not store, for a reason the client can act on."""


class FileTooLargeError(UploadRefusedError):
    """Past --max-file-mb."""


class QuotaExceededError(UploadRefusedError):
    """The data dir would hold more than --data-quota-mb."""


def data_dir_usage(data_dir: Path) -> int:
    """Bytes of the files, adapters and job outputs (checkpoints) under the data dir."""
    total = 0
    for sub in MEASURED_DIRS:
        for root, _, names in os.walk(data_dir / sub):
            for name in names:
                with contextlib.suppress(FileNotFoundError):  # removed while we walked
                    total += os.lstat(os.path.join(root, name)).st_size
    return total


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


class FileReceiver:
    """Writes one upload's bytes (write()) to a temporary file, checking each line when
    `validate`; commit() stores it, abort() removes it. Not thread-safe: one writer."""

    def __init__(
        self,
        store: JobStore,
        filename: str,
        max_bytes: int,
        quota_bytes: int | None,
        validate: bool = True,
    ) -> None:
        self.store = store
        self.filename = filename
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes
        self.validator = JsonlValidator(filename) if validate else None
        self.size = 0
        self._checked_at = 0  # self.size when the quota was last checked
        self._line = bytearray()
        self._line_too_long = False
        self.path = store.staging_path()
        self._file: BinaryIO | None = None
        self._check_quota(0)
        with disk_full_as_error("storing a file"):
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed by commit or abort)

    def write(self, data: bytes) -> None:
        """Append a piece of the upload; raises UploadRefusedError past a limit."""
        assert self._file is not None, "the upload is closed"
        if self.size + len(data) > self.max_bytes:
            raise FileTooLargeError(
                f"{self.filename} is larger than the server's limit of "
                f"{_mb(self.max_bytes)} per file (--max-file-mb)"
            )
        if self.size + len(data) - self._checked_at > QUOTA_CHECK_BYTES:
            self._check_quota(len(data))
            self._checked_at = self.size
        with disk_full_as_error("storing a file"):
            self._file.write(data)
            fault_point("files.write")
        self.size += len(data)
        if self.validator is not None:
            self._feed(data)

    def commit(self, purpose: str) -> FileRecord:
        """Check the last line and the quota, make the file durable and record it; raises
        DataError for a training file with bad lines (when validating)."""
        assert self._file is not None, "the upload is closed"
        num_examples = None
        if self.validator is not None:
            if self._line or self._line_too_long:
                self._end_line(bytes(self._line))
            if purpose == "fine-tune":
                num_examples = self.validator.finish()
        with disk_full_as_error("storing a file"):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            with _commit_lock:
                # Measured with this file on disk: two uploads cannot both pass the quota.
                self._check_quota(0)
                return self.store.commit_file(self.path, self.filename, purpose, num_examples)

    def abort(self) -> None:
        """Remove the temporary file (the upload is refused or failed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)

    def _check_quota(self, incoming: int) -> None:
        if self.quota_bytes is None:
            return
        used = data_dir_usage(self.store.data_dir)
        if used + incoming > self.quota_bytes:
            raise QuotaExceededError(
                f"storing {self.filename} would pass the data directory's quota of "
                f"{_mb(self.quota_bytes)} (--data-quota-mb; {_mb(used)} in use); "
                "delete files, adapters or finished jobs to make room"
            )

    def _feed(self, data: bytes) -> None:
        """Check every line that `data` completes; keep the unfinished rest (bounded)."""
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            if not self._line and end - start <= MAX_LINE_BYTES and not self._line_too_long:
                self._end_line(data[start:end])  # the common case: a whole line, no copy
            else:
                self._append(data[start:end])
                self._end_line(bytes(self._line))
            start = end + 1
        self._append(data[start:])

    def _append(self, piece: bytes) -> None:
        if self._line_too_long:
            return
        self._line += piece
        if len(self._line) > MAX_LINE_BYTES:
            self._line_too_long = True
            self._line.clear()

    def _end_line(self, line: bytes) -> None:
        assert self.validator is not None
        if self._line_too_long:
            self.validator.skip(f"longer than {_mb(MAX_LINE_BYTES)}")
        else:
            self.validator.feed(line)
        self._line_too_long = False
        self._line.clear()
