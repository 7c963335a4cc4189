"""Unpacking uploaded adapter archives, and refusing the unsafe ones."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import tarfile
import time
import zipfile

import pytest

from adapters import AdapterError, extract_adapter_files
from adapters.archive import MAX_MEMBERS

CONFIG = b'{"r": 2}'
WEIGHTS = b"safetensors bytes"
FILES = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
LIMIT = 1 << 20


def tar_bytes(
    members: dict[str, bytes], compress: bool = True, links: dict[str, str] | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if target.startswith("sym:") else tarfile.LNKTYPE
            info.linkname = target.removeprefix("sym:")
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "adapter_model.safetensors")
    return buf.getvalue()


def in_folder(folder: str, members: dict[str, bytes] = FILES) -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in members.items()}


def test_tar_gz_with_files_at_the_root() -> None:
    assert extract_adapter_files(tar_bytes(FILES), "a.tar.gz", LIMIT) == FILES


def test_tgz_with_files_in_a_single_top_level_folder() -> None:
    assert extract_adapter_files(tar_bytes(in_folder("my-adapter")), "a.tgz", LIMIT) == FILES


def test_plain_tar() -> None:
    assert extract_adapter_files(tar_bytes(FILES, compress=False), "a.tar", LIMIT) == FILES


def test_zip_in_a_folder_ignoring_macos_resource_forks() -> None:
    members = in_folder("out") | {"__MACOSX/out/._adapter_config.json": b"junk"}
    assert extract_adapter_files(zip_bytes(members), "A.ZIP", LIMIT) == FILES


def test_other_files_are_ignored() -> None:
    members = FILES | {"README.md": b"# card", "training_args.json": b"{}"}
    assert extract_adapter_files(tar_bytes(members), "a.tar.gz", LIMIT) == FILES


def test_missing_weights_are_named() -> None:
    with pytest.raises(AdapterError, match=r"archive has no adapter_model\.safetensors"):
        extract_adapter_files(tar_bytes({"adapter_config.json": CONFIG}), "a.tar.gz", LIMIT)


def test_two_top_level_folders_are_refused() -> None:
    members = in_folder("a", {"adapter_config.json": CONFIG}) | in_folder("b")
    with pytest.raises(AdapterError, match="at its root or inside a single top-level folder"):
        extract_adapter_files(zip_bytes(members), "a.zip", LIMIT)


def test_pickled_bin_weights_are_refused() -> None:
    members = {"adapter_config.json": CONFIG, "adapter_model.bin": b"\x80\x04pickle"}
    with pytest.raises(
        AdapterError, match=r"pickled \.bin adapters are refused; convert to safetensors"
    ):
        extract_adapter_files(zip_bytes(members), "a.zip", LIMIT)


def test_tar_parent_path_is_refused() -> None:
    members = FILES | {"../../etc/cron.d/x": b"boom"}
    with pytest.raises(AdapterError, match=r"'\.\./\.\./etc/cron\.d/x' escapes the archive"):
        extract_adapter_files(tar_bytes(members), "a.tar.gz", LIMIT)


def test_zip_parent_path_is_refused() -> None:
    members = in_folder("x/..")
    with pytest.raises(AdapterError, match=r"escapes the archive with '\.\.'"):
        extract_adapter_files(zip_bytes(members), "a.zip", LIMIT)


def test_absolute_path_is_refused() -> None:
    with pytest.raises(AdapterError, match=r"'/tmp/adapter_config\.json' has an absolute path"):
        extract_adapter_files(tar_bytes(in_folder("/tmp")), "a.tar.gz", LIMIT)


def test_tar_symlink_is_refused() -> None:
    archive = tar_bytes(
        {"adapter_config.json": CONFIG}, links={"adapter_model.safetensors": "sym:/etc/passwd"}
    )
    with pytest.raises(AdapterError, match=r"'adapter_model\.safetensors' is a link"):
        extract_adapter_files(archive, "a.tar.gz", LIMIT)


def test_tar_hardlink_is_refused() -> None:
    archive = tar_bytes(
        {"adapter_config.json": CONFIG},
        links={"adapter_model.safetensors": "adapter_config.json"},
        compress=False,
    )
    with pytest.raises(AdapterError, match="is a link; links are refused"):
        extract_adapter_files(archive, "a.tar", LIMIT)


def test_zip_symlink_is_refused() -> None:
    archive = zip_bytes({"adapter_config.json": CONFIG}, symlinks=("adapter_model.safetensors",))
    with pytest.raises(AdapterError, match="is a link; links are refused"):
        extract_adapter_files(archive, "a.zip", LIMIT)


def test_duplicate_member_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for data in (CONFIG, CONFIG):
            info = tarfile.TarInfo("adapter_config.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(AdapterError, match=r"holds 'adapter_config\.json' twice"):
        extract_adapter_files(buf.getvalue(), "a.tar", LIMIT)


def test_declared_sizes_over_the_limit_are_refused() -> None:
    members = FILES | {"adapter_model.safetensors": bytes(2000)}
    with pytest.raises(AdapterError, match="over the upload limit of 1000 bytes"):
        extract_adapter_files(zip_bytes(members), "a.zip", 1000)


def test_gzip_bomb_stops_at_the_limit() -> None:
    # 64 MiB of zeros compresses to ~64 KiB; unpacking must stop near the 1 MiB budget.
    members = FILES | {"adapter_model.safetensors": bytes(64 << 20)}
    archive = tar_bytes(members)
    assert len(archive) < 1 << 20
    with pytest.raises(AdapterError, match="archive unpacks to more than"):
        extract_adapter_files(archive, "a.tar.gz", LIMIT)


def test_zip_member_larger_than_declared_is_refused() -> None:
    archive = bytearray(
        zip_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(100_000)})
    )
    # Make both headers of the weights member (the second one) claim 10 bytes.
    local = archive.index(b"PK\x03\x04", 1)
    central = archive.index(b"PK\x01\x02", archive.index(b"PK\x01\x02") + 1)
    struct.pack_into("<I", archive, local + 22, 10)
    struct.pack_into("<I", archive, central + 24, 10)
    with pytest.raises(AdapterError, match="not a valid zip file"):
        extract_adapter_files(bytes(archive), "a.zip", LIMIT)


def test_unsupported_extension_is_refused() -> None:
    with pytest.raises(AdapterError, match=r"unsupported archive 'a\.rar'"):
        extract_adapter_files(b"Rar!", "a.rar", LIMIT)


def test_corrupt_gzip_is_refused() -> None:
    with pytest.raises(AdapterError, match="not a valid gzip file"):
        extract_adapter_files(os.urandom(256), "a.tar.gz", LIMIT)


def test_gzip_of_garbage_is_not_a_tar() -> None:
    with pytest.raises(AdapterError, match="not a valid tar file"):
        extract_adapter_files(gzip.compress(b"not a tar" * 100), "a.tgz", LIMIT)


def test_corrupt_zip_is_refused() -> None:
    with pytest.raises(AdapterError, match="not a valid zip file"):
        extract_adapter_files(b"PK\x03\x04" + os.urandom(100), "a.zip", LIMIT)


# ---- archives built to exhaust the server --------------------------------------------------


def gzip_members(data: bytes, piece: int) -> bytes:
    """data as a multi-member gzip, one member per piece bytes (as bgzip and pigz -i write)."""
    return b"".join(gzip.compress(data[i : i + piece], 1) for i in range(0, len(data), piece))


def test_multi_member_gzip_unpacks_in_linear_time() -> None:
    # 50k members over 8 MB: re-copying the rest of the input per member moves ~200 GB.
    padding = random.Random(0).randbytes(8 << 20)
    tar = tar_bytes(FILES | {"padding.bin": padding}, compress=False)
    assert len(tar) // 160 >= 50_000
    archive = gzip_members(tar, 160)
    start = time.perf_counter()
    assert extract_adapter_files(archive, "a.tar.gz", 16 << 20) == FILES
    assert time.perf_counter() - start < 5


def test_gzip_with_too_many_members_is_refused() -> None:
    archive = gzip.compress(tar_bytes(FILES, compress=False)) + gzip.compress(b"") * 70_000
    with pytest.raises(AdapterError, match="more than 65536 gzip members"):
        extract_adapter_files(archive, "a.tar.gz", LIMIT)


def test_tar_member_flood_is_refused_by_count() -> None:
    members = FILES | {f"junk/{i}": b"" for i in range(MAX_MEMBERS + 1)}
    with pytest.raises(AdapterError, match=f"more than {MAX_MEMBERS} members"):
        extract_adapter_files(tar_bytes(members, compress=False), "a.tar", 16 << 20)


def test_zip_member_count_is_refused_before_the_index_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = zip_bytes(FILES | {f"junk/{i}": b"" for i in range(MAX_MEMBERS)})

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("zipfile parsed the index of an oversized zip")

    monkeypatch.setattr(zipfile, "ZipFile", never)
    with pytest.raises(AdapterError, match=f"archive has {MAX_MEMBERS + 2} members, more than"):
        extract_adapter_files(archive, "a.zip", LIMIT)


def zip64_claiming(num_entries: int, index_bytes: int = 100) -> bytes:
    """A small zip whose end records are rewritten as zip64 ones claiming num_entries."""
    plain = zip_bytes(FILES)
    eocd = plain.rindex(b"PK\x05\x06")
    body = plain[:eocd]
    index_offset = struct.unpack_from("<L", plain, eocd + 16)[0]
    record = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, num_entries, num_entries,
        index_bytes, index_offset,
    )  # fmt: skip
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body), 1)
    classic = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0
    )
    return body + record + locator + classic


def test_zip64_member_count_is_read_from_the_zip64_end_record() -> None:
    with pytest.raises(AdapterError, match="archive has 1000000 members"):
        extract_adapter_files(zip64_claiming(10**6), "a.zip", LIMIT)


def test_zip_index_larger_than_its_bound_is_refused() -> None:
    with pytest.raises(AdapterError, match="zip index is 1073741824 bytes"):
        extract_adapter_files(zip64_claiming(2, index_bytes=1 << 30), "a.zip", LIMIT)


def test_zip_whose_count_understates_its_index_is_still_bounded() -> None:
    archive = bytearray(zip_bytes(FILES | {f"junk/{i}": b"" for i in range(MAX_MEMBERS)}))
    eocd = archive.rindex(b"PK\x05\x06")
    struct.pack_into("<2H", archive, eocd + 8, 2, 2)  # claims 2 entries
    with pytest.raises(AdapterError, match=f"more than {MAX_MEMBERS} members"):
        extract_adapter_files(bytes(archive), "a.zip", LIMIT)


def test_zip_without_an_end_record_is_refused() -> None:
    with pytest.raises(AdapterError, match="no end of central directory"):
        extract_adapter_files(zip_bytes(FILES)[:-22], "a.zip", LIMIT)


def test_zip_member_with_an_empty_name_is_skipped() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
        zf.writestr(zipfile.ZipInfo(""), b"x")  # zipfile.ZipInfo.is_dir() fails on this name
    assert extract_adapter_files(buf.getvalue(), "a.zip", LIMIT) == FILES


def test_tokenizer_files_beside_the_adapter_files_are_kept_and_others_ignored() -> None:
    template = {"tokenizer_config.json": b"{}", "chat_template.jinja": b"{{ messages }}"}
    members = in_folder("out", {**FILES, **template, "README.md": b"notes"})
    assert extract_adapter_files(tar_bytes(members), "a.tgz", LIMIT) == {**FILES, **template}
