"""One adapter's row in the index, and its forms: a SQLite row and a JSON manifest's fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.config import AdapterSpec

COLUMNS = (
    "name, sha256, created_at, size_bytes, rank, alpha, target_modules, "
    "rope_scaling_factor, source, spec_json"
)
VALUES = ", ".join("?" * len(COLUMNS.split(", ")))


@dataclass(frozen=True)
class AdapterRecord:
    """One row of the adapter index."""

    name: str
    sha256: str  # of adapter_model.safetensors
    created_at: int  # unix seconds
    size_bytes: int  # both files together
    rank: int  # the config's r
    alpha: float
    target_modules: tuple[str, ...]
    rope_scaling_factor: float
    source: str  # one of SOURCES
    spec_json: str  # AdapterSpec.to_dict() as JSON

    @property
    def spec(self) -> AdapterSpec:
        """The spec recorded when the adapter was validated."""
        return AdapterSpec.from_dict(json.loads(self.spec_json))


def record_to_dict(r: AdapterRecord) -> dict[str, Any]:
    """A record as JSON-ready fields (a shared store's manifest holds one)."""
    return dict(zip(COLUMNS.split(", "), record_row(r), strict=True))


def record_from_dict(fields: Mapping[str, Any]) -> AdapterRecord:
    """The inverse of record_to_dict."""
    return record_from_row(tuple(fields[c] for c in COLUMNS.split(", ")))


def record_row(r: AdapterRecord) -> tuple[object, ...]:
    return (
        r.name,
        r.sha256,
        r.created_at,
        r.size_bytes,
        r.rank,
        r.alpha,
        json.dumps(list(r.target_modules)),
        r.rope_scaling_factor,
        r.source,
        r.spec_json,
    )


def record_from_row(row: tuple[Any, ...]) -> AdapterRecord:
    name, sha, created, size, rank, alpha, targets, rope, source, spec_json = row
    return AdapterRecord(
        name=name,
        sha256=sha,
        created_at=created,
        size_bytes=size,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(json.loads(targets)),
        rope_scaling_factor=rope,
        source=source,
        spec_json=spec_json,
    )
