"""Adapters by URI: which URIs the roots allow, and hf:// from an offline hub cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters import AdapterError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapters.sources import SourceForbidden, adapter_name_for, check_allowed, fetched, scheme
from tests.unit.adapter_fixtures import tiny_files

ROOTS = ("/srv/adapters", "s3://bucket/loras", "hf://myorg")


def test_scheme_of_paths_and_uris() -> None:
    assert [scheme(u) for u in ("/a/b", "file:///a", "s3://b/k", "hf://o/n")] == [
        "file",
        "file",
        "s3",
        "hf",
    ]
    with pytest.raises(AdapterError, match="unsupported adapter URI scheme 'http'"):
        scheme("http://example.com/x")


@pytest.mark.parametrize(
    "uri", ["s3://bucket/loras/a", "hf://myorg/name", "hf://myorg/name@v1", "/srv/adapters/x"]
)
def test_uris_under_a_root_are_allowed(uri: str) -> None:
    check_allowed(uri, ROOTS)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/loras-evil/a",  # a prefix of the name is not a parent
        "s3://bucket/loras/../secret/a",
        "s3://other/loras/a",
        "hf://otherorg/name",
        "hf://myorgx/name",
        "/srv/other/x",
        "file:///srv/adapters/../other",
    ],
)
def test_uris_outside_every_root_are_refused(uri: str) -> None:
    with pytest.raises(SourceForbidden):
        check_allowed(uri, ROOTS)


def test_preloaded_uris_are_named_by_their_last_part_or_repo() -> None:
    assert adapter_name_for("s3://bucket/loras/sql/") == "sql"
    assert adapter_name_for("hf://myorg/sql-lora@main") == "myorg/sql-lora"


def _hub_cache(home: Path, repo: str) -> None:
    """A Hugging Face hub cache holding repo's adapter files at main, as the hub lays it out."""
    commit = "0" * 40
    cache = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = cache / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in tiny_files().items():
        (snapshot / name).write_bytes(data)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """huggingface_hub offline over cache (its constants are read at import, so set them)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hf_uris_come_from_the_offline_cache(tmp_path: Path, monkeypatch) -> None:
    offline_hub(monkeypatch, tmp_path / "hf" / "hub")
    _hub_cache(tmp_path / "hf", "myorg/one")
    with fetched("hf://myorg/one", tmp_path, 2**20) as adapter_dir:
        assert (adapter_dir / WEIGHTS_FILE).read_bytes() == tiny_files()[WEIGHTS_FILE]
        assert (adapter_dir / CONFIG_FILE).is_file()


def test_an_hf_uri_neither_cached_nor_reachable_is_refused_cleanly(
    tmp_path: Path, monkeypatch
) -> None:
    offline_hub(monkeypatch, tmp_path / "empty")
    refused = pytest.raises(AdapterError, match="not in the local Hugging Face cache")
    with refused as info, fetched("hf://myorg/missing", tmp_path, 2**20):
        pass
    assert str(tmp_path) not in str(info.value)


def test_s3_sources_bring_the_tokenizer_files_with_the_adapter(tmp_path: Path) -> None:
    import fsspec

    from adapters.shared_store import storage_options
    from tests.s3_server import moto_s3, new_bucket

    files = {**tiny_files(), "tokenizer_config.json": b'{"chat_template": "x"}'}
    with moto_s3() as endpoint:
        options = storage_options("s3://x", endpoint)
        bucket = new_bucket(endpoint)
        fs = fsspec.filesystem("s3", **options)
        for name, data in files.items():
            fs.pipe_file(f"{bucket}/one/{name}", data)
        fs.pipe_file(f"{bucket}/bare/{CONFIG_FILE}", files[CONFIG_FILE])
        with fetched(f"s3://{bucket}/one", tmp_path, 2**20, options) as adapter_dir:
            assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == files
        with (
            pytest.raises(AdapterError, match=f"does not hold {CONFIG_FILE} and {WEIGHTS_FILE}"),
            fetched(f"s3://{bucket}/bare", tmp_path, 2**20, options),
        ):
            pass
