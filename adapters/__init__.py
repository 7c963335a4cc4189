"""PEFT LoRA adapter artifacts: parse, validate, store, and cache. No engine or device code."""

from adapters.archive import extract_adapter_files
from adapters.base import LORA_MODULES, BaseModelInfo
from adapters.config import AdapterSpec, LoraTarget, parse_adapter_config
from adapters.errors import AdapterError, AdapterExistsError, AdapterNotFoundError
from adapters.format import (
    AdapterWeights,
    lora_config_dict,
    read_adapter,
    read_adapter_spec,
    write_adapter,
)
from adapters.host_cache import HostCacheStats
from adapters.registered import RegisteredAdapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterRecord, AdapterStore, check_adapter_name

__all__ = [
    "LORA_MODULES",
    "AdapterError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterRegistry",
    "AdapterSpec",
    "AdapterStore",
    "AdapterWeights",
    "BaseModelInfo",
    "HostCacheStats",
    "LoraTarget",
    "RegisteredAdapter",
    "check_adapter_name",
    "extract_adapter_files",
    "lora_config_dict",
    "parse_adapter_config",
    "read_adapter",
    "read_adapter_spec",
    "write_adapter",
]
