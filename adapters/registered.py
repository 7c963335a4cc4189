"""What the registry hands out: a registered adapter, a sync's findings, virtual names."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.config import AdapterSpec
from adapters.records import AdapterRecord

# Names of virtual adapters start with it; stored names cannot (check_adapter_name), so a
# virtual adapter never shadows a stored one nor is listed, stored or synced.
VIRTUAL_PREFIX = "."


def is_virtual(name: str) -> bool:
    """Whether name is a virtual adapter's (internal, never a client's to name)."""
    return name.startswith(VIRTUAL_PREFIX)


@dataclass(frozen=True)
class RegisteredAdapter:
    """An adapter the server can serve: its internal id, public name, spec and index row."""

    adapter_id: int  # unique within the process, never reused while it runs
    name: str
    spec: AdapterSpec
    record: AdapterRecord
    # 1, then +1 per in-place reload: (name, version) names one set of weights, as adapter_id
    # does, so anything cached from weights (KV, a future prefix cache) must key by either.
    version: int = 1


@dataclass(frozen=True)
class SyncResult:
    """What sync() found other replicas did."""

    # Deleted elsewhere, still registered here: the caller removes each from the engine
    # (refused while requests use it) and then store.evict(name).
    deleted: list[str]
    # Reloaded in place elsewhere, now registered here as (new, old): the caller retires old
    # in the engine, as after a local reload.
    replaced: list[tuple[RegisteredAdapter, RegisteredAdapter]]
