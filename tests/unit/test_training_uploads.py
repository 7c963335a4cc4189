"""Uploads into the file store, in pieces: lines checked across piece boundaries, the size and
quota limits, and a full disk; a refused upload leaves nothing behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.faults import DiskFullError, set_fault_points
from server.training.data import DataError
from server.training.jobs import JobStore
from server.training.uploads import (
    MAX_LINE_BYTES,
    FileReceiver,
    FileTooLargeError,
    QuotaExceededError,
    data_dir_usage,
)

ROW = json.dumps({"prompt": "Order: 2 1\nAnswer:", "completion": " 1 2"}).encode() + b"\n"


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path)


@pytest.fixture
def no_faults() -> Iterator[None]:
    yield
    set_fault_points(None)


def _receive(
    store: JobStore, data: bytes, piece: int, max_bytes: int = 2**30, quota: int | None = None
) -> FileReceiver:
    receiver = FileReceiver(store, "train.jsonl", max_bytes, quota)
    for start in range(0, len(data), piece):
        receiver.write(data[start : start + piece])
    return receiver


def _stored(store: JobStore) -> list[str]:
    return sorted(p.name for p in store.files_dir.iterdir())


@pytest.mark.parametrize("piece", [1, 7, 1 << 16])
def test_lines_split_across_pieces_are_checked_whole(store, piece):
    data = ROW * 20 + ROW.rstrip(b"\n")  # the last line has no newline
    rec = _receive(store, data, piece).commit("fine-tune")
    assert rec.num_examples == 21
    assert rec.bytes == len(data)
    assert store.file_path(rec.id).read_bytes() == data
    assert [r.id for r in store.list_files()[0]] == [rec.id]


def test_a_bad_line_is_named_by_number_and_the_upload_left_behind_nothing(store):
    data = ROW * 3 + b'{"prompt": "a"}\n' + ROW + b"not json\n"
    receiver = _receive(store, data, 5)
    with pytest.raises(DataError, match="line 4: missing key 'completion'.*line 6: invalid JSON"):
        receiver.commit("fine-tune")
    receiver.abort()
    assert _stored(store) == []


def test_other_purposes_are_stored_unchecked(store):
    receiver = FileReceiver(store, "notes.txt", 2**20, None, validate=False)
    receiver.write(b"not json\n")
    rec = receiver.commit("user_data")
    assert rec.num_examples is None
    assert store.file_path(rec.id).read_bytes() == b"not json\n"


def test_a_line_longer_than_the_limit_is_refused_without_being_held(store):
    data = ROW + b'{"text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n' + ROW
    receiver = _receive(store, data, 1 << 20)
    assert len(receiver._line) <= MAX_LINE_BYTES
    with pytest.raises(DataError, match="line 2: longer than 4.0 MB"):
        receiver.commit("fine-tune")


def test_a_file_past_max_bytes_is_refused_and_removed(store):
    with pytest.raises(FileTooLargeError, match="--max-file-mb"):
        receiver = FileReceiver(store, "big.jsonl", 10 * len(ROW), None)
        for _ in range(11):
            receiver.write(ROW)
    receiver.abort()
    assert _stored(store) == []


def test_an_upload_past_the_quota_is_refused_naming_it(store):
    store.add_file("old.jsonl", "fine-tune", ROW * 100, 100)
    used = data_dir_usage(store.data_dir)
    assert used == len(ROW) * 100
    receiver = _receive(store, ROW * 50, 1 << 16, quota=used + len(ROW) * 49)
    with pytest.raises(QuotaExceededError, match="--data-quota-mb"):
        receiver.commit("fine-tune")
    receiver.abort()
    assert len(_stored(store)) == 1


def test_an_upload_within_the_quota_is_stored(store):
    rec = _receive(store, ROW * 50, 1 << 16, quota=len(ROW) * 50).commit("fine-tune")
    assert rec.num_examples == 50


def test_a_full_disk_is_a_disk_full_error_and_leaves_nothing(store, no_faults):
    set_fault_points("files.write=enospc")
    receiver = FileReceiver(store, "train.jsonl", 2**20, None)
    with pytest.raises(DiskFullError, match="no space left") as info:
        receiver.write(ROW)
    assert str(store.data_dir) not in str(info.value)
    receiver.abort()
    assert _stored(store) == []
