"""Unpack an uploaded adapter archive (.tar.gz, .tgz, .tar, .zip) without trusting it.

Nothing is written to disk: the two adapter files are read into memory. Links, absolute or
`..` paths, and archives whose contents exceed the byte budget are refused; sizes are checked
both as declared and as actually read, so a zip or gzip bomb stops at the budget.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import IO

from adapters.errors import AdapterError, short_repr
from adapters.format import (
    ADAPTER_FILES,
    ALL_FILES,
    PICKLE_REFUSED,
    PICKLED_WEIGHTS_FILE,
    WEIGHTS_FILE,
)

MAX_MEMBERS = 1000
_CHUNK = 1 << 20
_GZIP_FEED = 4096
# bgzip-style archives hold one member per <= 64 KiB of output: 8k for a 512 MiB upload.
_MAX_GZIP_MEMBERS = 65536
# Tar headers and padding around the members: 512-byte blocks, rounded up to 10 KiB records.
_TAR_OVERHEAD_PER_MEMBER = 1024
_TAR_OVERHEAD = 64 * 1024
_IGNORED_PREFIX = "__MACOSX/"
# A central directory entry is 46 bytes plus name, extra and comment; 1 KiB each is generous.
_MAX_ZIP_INDEX_BYTES = MAX_MEMBERS * 1024
# End of central directory: signature, disk, index disk, entries here, entries, size,
# offset, comment length.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
# zip64 locator: signature, disk, offset of the zip64 end record, disks.
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
# zip64 end record: signature, record size, versions (2), disk, index disk, entries here,
# entries, size, offset.
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIG = b"PK\x06\x06"  # resource forks that macOS adds to zips


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
        f"unsupported archive {short_repr(filename)}; upload a .tar.gz, .tgz, .tar or .zip archive"
    )


def _gunzip(data: bytes, budget: int) -> bytes:
    """Decompress all gzip members, refusing output beyond budget bytes; linear in len(data)."""
    out = bytearray()
    view = memoryview(data)
    inflater: zlib._Decompress | None = None
    num_members = 0
    try:
        # Input goes in small pieces: zlib copies what follows a member's end into
        # unused_data, so feeding all of it at once costs O(members x size).
        for start in range(0, len(data), _GZIP_FEED):
            piece: bytes | memoryview = view[start : start + _GZIP_FEED]
            while piece:
                if inflater is None:
                    piece = bytes(piece).lstrip(b"\0")  # gzip allows zero padding between members
                    if not piece:
                        break
                    num_members += 1
                    if num_members > _MAX_GZIP_MEMBERS:
                        raise AdapterError(
                            f"archive has more than {_MAX_GZIP_MEMBERS} gzip members"
                        )
                    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
                out += inflater.decompress(piece, budget + 1 - len(out))
                if len(out) > budget:
                    raise AdapterError(f"archive unpacks to more than {budget} bytes")
                # Under the output cap, each call consumes its whole input, or ends the member.
                assert not inflater.unconsumed_tail
                piece = inflater.unused_data if inflater.eof else b""
                if inflater.eof:
                    inflater = None
        if inflater is not None or num_members == 0:
            raise AdapterError("archive is not a valid gzip file: truncated data")
    except zlib.error as e:
        raise AdapterError(f"archive is not a valid gzip file: {e}") from e
    return bytes(out)


def _from_tar(data: bytes, max_bytes: int) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            files: dict[str, tarfile.TarInfo] = {}
            # Headers are parsed one at a time, so the count stops a flood of them early.
            for num_members, m in enumerate(tar, 1):
                if num_members > MAX_MEMBERS:
                    raise AdapterError(f"archive has more than {MAX_MEMBERS} members")
                path = _safe_path(m.name)
                if m.issym() or m.islnk():
                    raise AdapterError(
                        f"archive member {short_repr(m.name)} is a link; links are refused"
                    )
                if m.isdir() or path is None:
                    continue
                if not m.isfile():
                    raise AdapterError(f"archive member {short_repr(m.name)} is not a regular file")
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
    _check_zip_index(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:  # the end record understated the count
                raise AdapterError(f"archive has more than {MAX_MEMBERS} members")
            files: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                path = _safe_path(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise AdapterError(
                        f"archive member {short_repr(info.filename)} is a link; links are refused"
                    )
                if path is None or info.is_dir():  # is_dir() fails on an empty name
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


def _check_zip_index(data: bytes) -> None:
    """Refuse a zip whose central directory is too long before zipfile parses any of it."""
    num_entries, index_bytes = _zip_index_size(data)
    if num_entries > MAX_MEMBERS:
        raise AdapterError(f"archive has {num_entries} members, more than {MAX_MEMBERS}")
    # zipfile reads entries until index_bytes are used up, whatever the count says.
    if index_bytes > _MAX_ZIP_INDEX_BYTES:
        raise AdapterError(
            f"archive's zip index is {index_bytes} bytes, more than {_MAX_ZIP_INDEX_BYTES}"
        )


def _zip_index_size(data: bytes) -> tuple[int, int]:
    """(entries, central directory bytes) from the end-of-central-directory record(s)."""
    # The record is 22 bytes plus a comment of up to 64 KiB: found as zipfile finds it, at
    # the very end when there is no comment, else at the last signature before the end.
    at = len(data) - _EOCD.size
    if at < 0 or data[at : at + 4] != _EOCD_SIG:
        at = data.rfind(_EOCD_SIG, max(0, at - 0xFFFF), max(0, at + 4))
    if at < 0:
        raise AdapterError("archive is not a valid zip file: no end of central directory")
    _, _, _, on_disk, total, size, _, _ = _EOCD.unpack_from(data, at)
    entries = max(on_disk, total)
    if entries != 0xFFFF and size != 0xFFFFFFFF:
        return entries, size
    # zip64: a locator just before the record points at the zip64 end record.
    locator = at - _ZIP64_LOCATOR.size
    if locator < 0 or data[locator : locator + 4] != _ZIP64_LOCATOR_SIG:
        return entries, size
    _, _, record, _ = _ZIP64_LOCATOR.unpack_from(data, locator)
    if record + _ZIP64_EOCD.size > len(data) or data[record : record + 4] != _ZIP64_EOCD_SIG:
        raise AdapterError("archive is not a valid zip file: bad zip64 end record")
    fields = _ZIP64_EOCD.unpack_from(data, record)
    return max(fields[6], fields[7]), fields[8]


def _safe_path(name: str) -> str | None:
    """The member's normalized relative path, None for entries to skip; refuses escapes."""
    if name.startswith(_IGNORED_PREFIX):
        return None
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise AdapterError(f"archive member {short_repr(name)} has an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise AdapterError(f"archive member {short_repr(name)} escapes the archive with '..'")
    return "/".join(parts) or None


def _unique(path: str, seen: Mapping[str, object]) -> str:
    if path in seen:
        raise AdapterError(f"archive holds {short_repr(path)} twice")
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
    optional = {name: prefix + name for name in ALL_FILES if name not in ADAPTER_FILES}
    return wanted | {name: path for name, path in optional.items() if path in files}


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
