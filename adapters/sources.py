"""Adapters by URI: a local path or file://, s3://bucket/key (any S3-compatible endpoint) and
hf://org/name[@revision] (huggingface_hub, offline from the local hub cache when it must).

Every URI must fall under an allowed root (--adapter-roots): directories for paths, and
`s3://bucket/prefix` or `hf://org` prefixes for the others; nothing is read otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from adapters.errors import AdapterError
from adapters.format import ADAPTER_FILES, ALL_FILES, CONFIG_FILE

logger = logging.getLogger(__name__)

SCHEMES = ("file", "s3", "hf")


class SourceForbidden(AdapterError):
    """A URI outside every allowed root."""


def scheme(uri: str) -> str:
    """'file', 's3' or 'hf' ('file' for a plain path); an AdapterError for any other."""
    head, sep, _ = uri.partition("://")
    if not sep:
        return "file"
    if head not in SCHEMES:
        raise AdapterError(f"unsupported adapter URI scheme {head!r}; use file://, s3:// or hf://")
    return head


def local_path(uri: str) -> Path:
    """The path of a plain path or file:// URI."""
    return Path(uri.removeprefix("file://"))


def inside_roots(path: Path, roots: tuple[str, ...]) -> bool:
    """Whether path, and each adapter file in it, resolves (links followed) inside a root."""
    targets = [path, *(path / f for f in ALL_FILES if (path / f).exists())]
    allowed = [local_path(r).resolve() for r in roots if scheme(r) == "file"]
    return all(any(t.resolve().is_relative_to(r) for r in allowed) for t in targets)


def check_allowed(uri: str, roots: tuple[str, ...]) -> None:
    """Refuse (SourceForbidden) a URI outside the allowed roots; paths are resolved first."""
    kind = scheme(uri)
    if kind == "file":
        if not inside_roots(local_path(uri), roots):
            raise SourceForbidden(f"{uri!r} is outside the allowed --adapter-roots")
        return
    prefixes = [r.rstrip("/") + "/" for r in roots if r.startswith(f"{kind}://")]
    if ".." in uri.split("/") or not any(uri.startswith(p) for p in prefixes):
        raise SourceForbidden(f"{uri!r} is not under an allowed {kind}:// entry of --adapter-roots")


@contextlib.contextmanager
def fetched(
    uri: str, scratch: Path, max_bytes: int, s3_options: Mapping[str, Any] | None = None
) -> Iterator[Path]:
    """A local directory holding the adapter at uri (downloaded into scratch if remote)."""
    kind = scheme(uri)
    if kind == "file":
        yield local_path(uri)
    elif kind == "hf":
        yield _from_hub(uri)
    else:
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=scratch) as tmp:
            _from_s3(uri, Path(tmp), max_bytes, s3_options or {})
            yield Path(tmp)


def _from_s3(uri: str, dest: Path, max_bytes: int, options: Mapping[str, Any]) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **dict(options))
    fs.invalidate_cache()
    root = root.rstrip("/")
    try:
        present = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        if not present.issuperset(ADAPTER_FILES):
            raise FileNotFoundError(root)
        sizes = {f: fs.size(f"{root}/{f}") for f in ALL_FILES if f in present}
    except FileNotFoundError as exc:
        raise AdapterError(f"{uri} does not hold {' and '.join(ADAPTER_FILES)}") from exc
    except Exception as exc:  # botocore raises its own types for auth, network, endpoint
        raise AdapterError(f"cannot read {uri}: {type(exc).__name__}") from exc
    if sum(sizes.values()) > max_bytes:
        raise AdapterError(f"{uri} is larger than {max_bytes >> 20} MB (--max-upload-mb)")
    for file in sizes:
        fs.get_file(f"{root}/{file}", str(dest / file))
    logger.info("fetched adapter files from %s", uri)


def _from_hub(uri: str) -> Path:
    from huggingface_hub import snapshot_download

    repo, _, revision = uri.removeprefix("hf://").strip("/").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise AdapterError(f"{uri!r}: expected hf://org/name or hf://org/name@revision")
    try:
        path = snapshot_download(repo, revision=revision or None, allow_patterns=list(ALL_FILES))
    except Exception as exc:  # offline, not cached, no such repo: the hub's many error types
        raise AdapterError(
            f"cannot get {uri}: it is not in the local Hugging Face cache and the Hub could "
            f"not provide it ({type(exc).__name__})"
        ) from exc
    if not (Path(path) / CONFIG_FILE).is_file():
        raise AdapterError(f"{uri} holds no {CONFIG_FILE}")
    return Path(path)


def adapter_name_for(uri: str) -> str:
    """The name a preloaded URI registers under: hf's org/name, else the last path part."""
    if scheme(uri) == "hf":
        return uri.removeprefix("hf://").strip("/").partition("@")[0]
    return uri.rstrip("/").rsplit("/", 1)[-1]
