"""Building an engine's parts from its config: the model, the page pool, the adapter registry."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from server.config import DEFAULT_CPU_POOL_MB, ConfigError, EngineConfig
from server.engine.backends import KernelBackend
from server.engine.memory_budget import activation_bytes, split_memory
from server.lora.batch import LoRAOps
from server.lora.residency import DeviceAdapterCache
from server.memory.page_pool import PageGeometry, PagePool
from server.memory.prefix_cache import PrefixCache
from server.memory.reclaim import EvictionClock, EvictionSource, PoolReclaimer
from server.model.config import ModelConfig
from server.model.generation_config import (
    GenerationConfig,
    GenerationDefaults,
    generation_defaults,
)
from server.model.llama import LlamaForCausalLM
from server.model.loader import load_model, module_bytes
from server.model.precision import auto_quantize, device_memory_bytes
from server.model.quant import quantize_nf4
from server.model.tokenizer import Tokenizer, TokenizerError

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry
    from adapters.store import AdapterBackend

logger = logging.getLogger(__name__)


def checkpoint_text_files(
    config: EngineConfig, cfg: ModelConfig
) -> tuple[Tokenizer, GenerationDefaults]:
    """The tokenizer (with the chat template in force) and the request defaults, logged."""
    assert config.model is not None
    model_dir = Path(config.model)
    generation = GenerationConfig.from_dir(model_dir)
    tokenizer = Tokenizer(
        model_dir,
        extra_eos_token_ids=cfg.eos_token_ids + generation.eos_token_ids,
        chat_template=config.chat_template,
    )
    defaults = generation_defaults(config.generation_config, model_dir)
    logger.info(
        "chat template: %s; tokens ending generation: %s; request defaults (--generation-config "
        "%s): %s",
        tokenizer.chat_template_origin or "none (chat routes are refused)",
        sorted(tokenizer.eos_token_ids),
        config.generation_config,
        defaults.as_dict() or "none",
    )
    return tokenizer, defaults


def with_quantize_chosen(config: EngineConfig) -> EngineConfig:
    """config with `--quantize auto` replaced by what it means for this model and device."""
    if config.quantize != "auto":
        return config
    assert config.model is not None
    cfg = ModelConfig.from_dir(config.model)
    memory = device_memory_bytes(config.torch_device)
    chosen = auto_quantize(cfg.num_params, config.torch_dtype, memory)
    logger.info(
        "--quantize auto: %s (%.2fB parameters in %s, %.0f GiB of %s memory)",
        chosen,
        cfg.num_params / 1e9,
        config.torch_dtype,
        memory / 2**30,
        config.torch_device.type,
    )
    return dataclasses.replace(config, quantize=chosen)


def build_model(config: EngineConfig, model_dir: Path, kernels: KernelBackend) -> LlamaForCausalLM:
    """Load the checkpoint, quantize it if asked, put it on the device and bind the kernels."""
    start = time.perf_counter()
    config = with_quantize_chosen(config)
    model = load_model(model_dir, config.torch_dtype)
    if config.quantize == "nf4":
        quantize_nf4(model, config.torch_dtype, config.torch_device)
    model.to(config.torch_device)
    kernels.adapt(model)
    cfg = model.config
    logger.info(
        "loaded %s from %s in %.1fs: %d layers, %.1fM parameters, weights %.1f MiB (%s, %s, %s)",
        cfg.architecture,
        model_dir,
        time.perf_counter() - start,
        cfg.num_layers,
        cfg.num_params / 1e6,
        module_bytes(model) / 2**20,
        config.quantize,
        str(config.torch_dtype).removeprefix("torch."),
        config.torch_device,
    )
    return model


def open_registry(
    data_dir: str | Path, config: EngineConfig, store: AdapterBackend | None = None
) -> AdapterRegistry:
    """The adapter store (default: the local one under data_dir), indexed and validated
    against the engine's model."""
    from adapters import AdapterRegistry, AdapterStore, BaseModelInfo

    assert config.model is not None
    raw = json.loads((Path(config.model) / "config.json").read_text())
    try:
        vocabulary = Tokenizer(config.model).vocabulary()
    except TokenizerError:
        vocabulary = None  # then adapters that ship tokenizer files are refused
    registry = AdapterRegistry(
        store if store is not None else AdapterStore(Path(data_dir)),
        BaseModelInfo.from_hf_config(raw, vocabulary),
        config.max_lora_rank,
        config.host_cache_mb * 2**20,
        pin_memory=config.torch_device.type == "cuda",
        dtype=config.torch_dtype,
    )
    registry.load_index()
    return registry


def _cuda_pool_bytes(config: EngineConfig, cfg: ModelConfig) -> int:
    free, total = torch.cuda.mem_get_info(config.torch_device)
    dtype_bytes = torch.finfo(config.torch_dtype).bits // 8
    activations = activation_bytes(
        cfg,
        config.max_num_batched_tokens,
        config.max_num_seqs,
        config.max_lora_rank,
        dtype_bytes,
    )
    split = split_memory(
        total,
        free,
        config.gpu_memory_utilization,
        activations,
        config.training_memory_mb * 2**20,
    )
    logger.info("device memory: %s", split.describe())
    if split.pool == 0:
        raise ConfigError(
            f"no GPU memory is left for the page pool: {split.describe()}; raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens, --max-num-seqs or "
            "--training-memory-mb, or set --pool-mb"
        )
    return split.pool


def make_pool(config: EngineConfig, cfg: ModelConfig) -> PagePool:
    """The page pool: --num-pages, --pool-mb, the GPU's share left after weights and reserves
    (--gpu-memory-utilization), or 1 GiB on CPU."""
    geometry = PageGeometry.for_model(cfg, config.block_size, config.max_lora_rank)
    page_bytes = geometry.page_numel * torch.finfo(config.torch_dtype).bits // 8
    if config.num_pages is not None:
        pool_bytes = config.num_pages * page_bytes
    elif config.pool_mb is not None:
        pool_bytes = config.pool_mb * 2**20
    elif config.torch_device.type == "cuda":
        pool_bytes = _cuda_pool_bytes(config, cfg)
    else:
        pool_bytes = DEFAULT_CPU_POOL_MB * 2**20
    num_pages = pool_bytes // page_bytes
    pool = PagePool(num_pages, geometry, config.torch_dtype, config.torch_device)
    logger.info(
        "page pool: %d pages x %.2f MiB (%d-token KV blocks) = %.1f MiB",
        num_pages,
        page_bytes / 2**20,
        geometry.block_size,
        num_pages * page_bytes / 2**20,
    )
    return pool


@dataclass(frozen=True)
class PoolTenants:
    """What lives in the page pool besides running requests' KV, under one eviction policy:
    resident adapters, cached prefix blocks, and the reclaimer over both."""

    clock: EvictionClock
    adapters: DeviceAdapterCache | None
    prefixes: PrefixCache | None
    reclaimer: PoolReclaimer


def pool_tenants(
    config: EngineConfig,
    pool: PagePool,
    cfg: ModelConfig,
    registry: AdapterRegistry | None,
    lora: LoRAOps,
) -> PoolTenants:
    """The adapter residency (when adapters are served) and the prefix cache (unless turned
    off), both evicted by one PoolReclaimer (server.memory.reclaim)."""
    clock = EvictionClock()
    sources: list[EvictionSource] = []
    adapters = None
    if registry is not None:
        adapters = DeviceAdapterCache(
            pool,
            registry,
            cfg,
            config.max_loras,
            config.max_lora_rank,
            lora,
            clock=clock,
        )
        sources.append(adapters)
    prefixes = PrefixCache(pool, clock) if config.enable_prefix_caching else None
    if prefixes is not None:
        sources.append(prefixes)
    reclaimer = PoolReclaimer(clock, sources)
    if adapters is not None:
        adapters.reclaimer = reclaimer
    return PoolTenants(clock, adapters, prefixes, reclaimer)
