"""Unpack an uploaded adapter archive (.tar.gz, .tgz, .tar, .zip) without trusting it.

Nothing is written to disk: the two adapter files are read into memory. Links, absolute or
`..` paths, and archives whose contents exceed the byte budget are refused; sizes are checked
both as declared and as actually read, so a zip or gzip bomb stops at the budget.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import IO

from adapters.errors import AdapterError
from adapters.format import ADAPTER_FILES, PICKLE_REFUSED, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE

MAX_MEMBERS = 1000
_CHUNK = 1 << 20
# Tar headers and padding around the members: 512-byte blocks, rounded up to 10 KiB records.
_TAR_OVERHEAD_PER_MEMBER = 1024
_TAR_OVERHEAD = 64 * 1024
_IGNORED_PREFIX = "__MACOSX/"  # resource forks that macOS adds to zips


def extract_adapter_files(data: bytes, filename: str, max_bytes: int) -> dict[str, bytes]:
    """The two adapter files' bytes from an archive, at its root or in one top-level folder."""
    lower = filename.lower()
    if lower.endswith(".zip"):
        return _from_zip(data, max_bytes)
    if lower.endswith((".tar.gz", ".tgz")):
        budget = max_bytes + _TAR_OVERHEAD + MAX_MEMBERS * _TAR_OVERHEAD_PER_MEMBER
        return _from_tar(_gunzip(data, budget), max_bytes)
    if lower.endswith(".tar"):
        return _from_tar(data, max_bytes)
    raise AdapterError(
        f"unsupported archive {filename!r}; upload a .tar.gz, .tgz, .tar or .zip archive"
    )


def _gunzip(data: bytes, budget: int) -> bytes:
    """Decompress all gzip members, refusing output beyond budget bytes."""
    out = bytearray()
    rest = data
    try:
        while rest:
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            pending = rest
            while pending and not inflater.eof:
                out += inflater.decompress(pending, budget + 1 - len(out))
                if len(out) > budget:
                    raise AdapterError(f"archive unpacks to more than {budget} bytes")
                pending = inflater.unconsumed_tail
            if not inflater.eof:
                raise AdapterError("archive is not a valid gzip file: truncated data")
            rest = inflater.unused_data.lstrip(b"\0")  # gzip allows zero padding after members
    except zlib.error as e:
        raise AdapterError(f"archive is not a valid gzip file: {e}") from e
    return bytes(out)


def _from_tar(data: bytes, max_bytes: int) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise AdapterError(f"archive has more than {MAX_MEMBERS} members")
            files: dict[str, tarfile.TarInfo] = {}
            for m in members:
                path = _safe_path(m.name)
                if m.issym() or m.islnk():
                    raise AdapterError(f"archive member {m.name!r} is a link; links are refused")
                if m.isdir() or path is None:
                    continue
                if not m.isfile():
                    raise AdapterError(f"archive member {m.name!r} is not a regular file")
                files[_unique(path, files)] = m
            _check_declared((m.size for m in files.values()), max_bytes)
            result: dict[str, bytes] = {}
            for name, path in _select(files).items():
                stream = tar.extractfile(files[path])
                assert stream is not None, path
                result[name] = _read_capped(stream, max_bytes - _total(result))
            return result
    except (tarfile.TarError, EOFError) as e:
        raise AdapterError(f"archive is not a valid tar file: {e}") from e


def _from_zip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise AdapterError(f"archive has more than {MAX_MEMBERS} members")
            files: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                path = _safe_path(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise AdapterError(
                        f"archive member {info.filename!r} is a link; links are refused"
                    )
                if info.is_dir() or path is None:
                    continue
                files[_unique(path, files)] = info
            _check_declared((i.file_size for i in files.values()), max_bytes)
            result: dict[str, bytes] = {}
            for name, path in _select(files).items():
                with zf.open(files[path]) as stream:
                    result[name] = _read_capped(stream, max_bytes - _total(result))
            return result
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression
        raise AdapterError(f"archive is not a valid zip file: {e}") from e
    except (zlib.error, EOFError) as e:
        raise AdapterError(f"archive is not a valid zip file: {e}") from e


def _safe_path(name: str) -> str | None:
    """The member's normalized relative path, None for entries to skip; refuses escapes."""
    if name.startswith(_IGNORED_PREFIX):
        return None
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise AdapterError(f"archive member {name!r} has an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise AdapterError(f"archive member {name!r} escapes the archive with '..'")
    return "/".join(parts) or None


def _unique(path: str, seen: Mapping[str, object]) -> str:
    if path in seen:
        raise AdapterError(f"archive holds {path!r} twice")
    return path


def _check_declared(sizes: Iterable[int], max_bytes: int) -> None:
    total = sum(sizes)
    if total > max_bytes:
        raise AdapterError(
            f"archive contents are {total} bytes, over the upload limit of {max_bytes} bytes"
        )


def _select(files: Mapping[str, object]) -> dict[str, str]:
    """Archive paths of the adapter files: at the root, or inside one top-level folder."""
    prefix = ""
    if not any(name in files for name in (*ADAPTER_FILES, PICKLED_WEIGHTS_FILE)):
        tops = {path.split("/", 1)[0] for path in files}
        if len(tops) == 1 and all("/" in path for path in files):
            prefix = f"{tops.pop()}/"
    wanted = {name: prefix + name for name in ADAPTER_FILES}
    if wanted[WEIGHTS_FILE] not in files and prefix + PICKLED_WEIGHTS_FILE in files:
        raise AdapterError(PICKLE_REFUSED)
    for name, path in wanted.items():
        if path not in files:
            raise AdapterError(
                f"archive has no {name} at its root or inside a single top-level folder"
            )
    return wanted


def _read_capped(stream: IO[bytes], limit: int) -> bytes:
    """Read a member, stopping as soon as it proves larger than limit bytes."""
    out = bytearray()
    while chunk := stream.read(_CHUNK):
        out += chunk
        if len(out) > limit:
            raise AdapterError("archive contents exceed the upload limit while unpacking")
    return bytes(out)


def _total(files: Mapping[str, bytes]) -> int:
    return sum(len(data) for data in files.values())
