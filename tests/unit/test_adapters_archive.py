"""Unpacking uploaded adapter archives, and refusing the unsafe ones."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zipfile

import pytest

from adapters import AdapterError, extract_adapter_files

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
