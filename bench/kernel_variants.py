"""Every Triton launch the engine makes for a model, recorded through the project's launchers.

The launchers (`nf4_matmul`, `paged_attention_layer`, and the LoRA batch's `add_lora`, which
calls `lora_triton`) run on CPU tensors laid out as the engine lays them out on the GPU: the page
pool's per-layer KV views, the step buffers' views, the slot tables' per-layer views, the run
buffers of a decode graph. Each Triton kernel is swapped for a recorder, so nothing runs: what
the launch would have passed is kept, for Triton's own binder to specialise for a GPU target
(bench/kernels_compiled.py). Nothing here needs a GPU or TRITON_INTERPRET.

Steps covered per model and dtype: decode-graph buckets (every batch size a CUDA graph is
captured for, LoRA metadata as the graph holds it: every run buffer, the engine's
--max-lora-rank), eager decode at the same batch sizes (one adapter per sequence), and a
prefill chunk of --max-num-batched-tokens tokens. Layers 0-3 only: what differs between layers
is the byte offset of per-layer views, and 16-byte alignment of a view at layer * stride repeats
every 4 layers for elements of 4 bytes or more.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.model.config import PACKED_LINEARS, ModelConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LAYERS_DRIVEN = 4


def _config(**raw: Any) -> ModelConfig:
    return ModelConfig.from_dict(raw)


# The real checkpoints' config.json fields that shape the kernels.
# fmt: off
MODELS: dict[str, ModelConfig] = {
    "llama3-8b": _config(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192,
    ),
    "mistral-7b": _config(
        architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=32768, sliding_window=4096,
    ),
    "qwen2-7b": _config(
        architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, use_sliding_window=False,
    ),
    "smollm2-135m": _config(
        architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, tie_word_embeddings=True,
    ),
}
# fmt: on


@dataclass(frozen=True)
class ServingShape:
    """The engine settings that decide launch shapes."""

    max_num_seqs: int = 256
    prefill_tokens: int = 2048  # --max-num-batched-tokens: one chunk of one long prompt
    max_lora_ranks: tuple[int, ...] = (8, 16, 64)  # --max-lora-rank values
    max_loras: int = 32
    block_size: int = 16
    context: int = 4096  # keys per decoding sequence (block tables sized for it)


@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its grid and the arguments it got."""

    kernel: Any  # the JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    step: str = ""  # what launched it, e.g. "llama3-8b bf16 decode-graph b32 r16"


@dataclass
class Recording:
    """Launches recorded while launchers ran, tagged by the step that made them."""

    launches: list[Launch] = field(default_factory=list)
    step: str = ""
    on_launch: Callable[[Launch], None] | None = None  # told of each launch as it is recorded


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records instead of running."""

    def __init__(self, kernel: Any, recording: Recording) -> None:
        self.kernel = kernel
        self.recording = recording

    def __getitem__(self, grid: tuple[int, ...]):  # type: ignore[no-untyped-def]
        def launch(*args: Any, **kwargs: Any) -> None:
            launch_grid = tuple(grid) if isinstance(grid, tuple | list) else (grid,)
            launched = Launch(self.kernel, launch_grid, args, kwargs, self.recording.step)
            self.recording.launches.append(launched)
            if self.recording.on_launch is not None:
                self.recording.on_launch(launched)

        return launch


def jit_kernels() -> dict[tuple[str, str], Any]:
    """(module, name) -> every Triton kernel in server.kernels' modules (the launchers call
    them as module attributes, which the recorder replaces): JITFunctions, or under
    TRITON_INTERPRET=1 the interpreter's stand-ins (enough to count launches, not to compile)."""
    from triton.runtime.jit import KernelInterface

    import server.kernels

    names = [info.name for info in pkgutil.iter_modules(server.kernels.__path__, "server.kernels.")]
    found = {}
    for name in [*names, "server.lora.triton_ops"]:  # the LoRA launchers (kernels there before)
        for attr, value in vars(importlib.import_module(name)).items():
            if isinstance(value, KernelInterface):
                found[(name, attr)] = value
    assert found, "no Triton kernel found in server.kernels"
    return found


class _SkipMatmuls(TorchDispatchMode):
    """torch's own matrix products are not what this harness compiles: their outputs are
    left as allocated instead of computed (the dequantize-then-GEMM path of a 2048-token
    prefill would otherwise multiply for minutes on the CPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func.overloadpacket in _MATMULS:
            out = kwargs.get("out")
            return out if out is not None else func(*args, **kwargs)
        return func(*args, **kwargs)


_MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm)


@contextlib.contextmanager
def recording_launches() -> Iterator[Recording]:
    """Swap every kernel for a recorder while the block runs."""
    recording = Recording()
    kernels = jit_kernels()
    try:
        for (module, attr), kernel in kernels.items():
            setattr(importlib.import_module(module), attr, _Recorder(kernel, recording))
        yield recording
    finally:
        for (module, attr), kernel in kernels.items():
            setattr(importlib.import_module(module), attr, kernel)


def _nf4_weights(cfg: ModelConfig) -> dict[str, Any]:
    """Packed linear -> NF4 storage of its shape (uninitialized: only shapes and dtypes matter)."""
    from server.kernels.nf4_matmul import NF4Weight

    shapes = cfg.linear_shapes()
    weights = {}
    for packed, parts in PACKED_LINEARS.items():
        in_features = shapes[parts[0]][0]
        out_features = sum(shapes[p][1] for p in parts)
        numel = out_features * in_features
        weights[packed] = NF4Weight(
            packed=torch.empty(numel // 2, dtype=torch.uint8),
            absmax=torch.empty(numel // 64, dtype=torch.uint8),
            code=torch.empty(16),
            absmax2=torch.empty(-(-numel // 64 // 256)),
            code2=torch.empty(256),
            offset=0.0,
            out_features=out_features,
            in_features=in_features,
            blocksize=64,
            blocksize2=256,
        )
    return weights


def _linear_io(cfg: ModelConfig, packed: str) -> tuple[int, int]:
    shapes = cfg.linear_shapes()
    parts = PACKED_LINEARS[packed]
    return shapes[parts[0]][0], sum(shapes[p][1] for p in parts)


def drive_linears(cfg: ModelConfig, dtype: torch.dtype, num_tokens: int, weights: dict) -> None:
    """The four NF4 linears of a layer, called as TritonNF4Linear.forward calls the kernel."""
    from server.kernels.nf4_matmul import nf4_matmul

    for packed, weight in weights.items():
        bias = None
        if packed == "qkv_proj" and cfg.qkv_bias:
            bias = torch.empty(weight.out_features, dtype=dtype)
        nf4_matmul(torch.empty(num_tokens, weight.in_features, dtype=dtype), weight, bias)


def drive_attention(
    cfg: ModelConfig,
    dtype: torch.dtype,
    pool: Any,
    meta: Any,
    num_tokens: int,
    layers: range = range(LAYERS_DRIVEN),
) -> None:
    """One layer's serving attention, with q/k/v laid out as Attention receives them (q and k
    fresh from RoPE, v a view of the qkv output), on the pool's KV views of each layer."""
    from server.kernels.paged_attention import paged_attention_layer

    heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = torch.empty(num_tokens, cfg.q_size + 2 * cfg.kv_size, dtype=dtype)
    q = torch.empty(num_tokens, heads, dim, dtype=dtype)
    k = torch.empty(num_tokens, kv_heads, dim, dtype=dtype)
    v = qkv[:, cfg.q_size + cfg.kv_size :].view(num_tokens, kv_heads, dim)
    for layer in layers:
        k_cache, v_cache = pool.kv_views(layer)
        paged_attention_layer(q, k, v, k_cache, v_cache, meta, cfg.sliding_window)


def drive_lora(
    cfg: ModelConfig,
    dtype: torch.dtype,
    batch: Any,
    num_tokens: int,
    layers: range = range(LAYERS_DRIVEN),
) -> None:
    """Every LoRA linear of each driven layer, as LoRALinear.forward calls the batch."""
    from server.lora.batch import Linear
    from server.lora.layout import LORA_MODULES

    for layer in layers:
        for module, (packed, _) in enumerate(LORA_MODULES):
            in_features, out_features = _linear_io(cfg, packed)
            x = torch.empty(num_tokens, in_features, dtype=dtype)
            out = torch.empty(num_tokens, out_features, dtype=dtype)
            batch.add_lora(x, out, Linear(layer, module, cfg.packed_slices(packed)))


@dataclass
class _Engine:
    """The engine's device state a step's launches read, on the CPU."""

    pool: Any  # PagePool
    buffers: Any  # StepBuffers
    tables: Any  # SlotTables
    segment_buffers: Any  # SegmentBuffers
    max_rank: int

    @property
    def block_size(self) -> int:
        return self.pool.geometry.block_size


def _engine(cfg: ModelConfig, dtype: torch.dtype, shape: ServingShape, rank: int) -> _Engine:
    from server.engine.step_inputs import StepBuffers
    from server.lora import layout
    from server.lora.batch import SegmentBuffers
    from server.lora.slots import SlotTables
    from server.memory.page_pool import PageGeometry, PagePool

    cpu = torch.device("cpu")
    geometry = PageGeometry.for_model(cfg, shape.block_size, rank)
    pool = PagePool(2, geometry, dtype, cpu)
    max_blocks = -(-shape.context // geometry.block_size)
    buffers = StepBuffers(shape.prefill_tokens, shape.max_num_seqs, max_blocks, cpu)
    if hasattr(layout, "offset_alignment"):
        align = layout.offset_alignment(cfg, pool.page_numel)
        tables = SlotTables(cfg.num_layers, shape.max_loras, cpu, align)
    else:  # a tree from before the alignment promise (bench.launch_count's "before")
        tables = SlotTables(cfg.num_layers, shape.max_loras, cpu)
    return _Engine(pool, buffers, tables, SegmentBuffers(shape.max_loras, cpu), rank)


def _attention_meta(engine: _Engine, num_seqs: int, num_tokens: int, num_blocks: int | None):
    """The kernel path's metadata as views of the step buffers: num_blocks None is a decode
    graph's (whole block-table rows), else the eager path's (fill_seqs: the step's columns)."""
    from server.engine.step_inputs import StepBuffers
    from server.model.context import AttentionMetadata, SeqLayout

    buf = engine.buffers
    tokens, seqs = buf.tokens[:, :num_tokens], buf.seqs[:, :num_seqs]
    tables = (
        buf.block_tables[:num_seqs]
        if num_blocks is None
        else buf.block_tables[:num_seqs, :num_blocks]
    )
    layout = SeqLayout(
        q_starts=seqs[StepBuffers.Q_STARTS],
        q_lens=seqs[StepBuffers.Q_LENS],
        ctx_lens=seqs[StepBuffers.CTX_LENS],
        block_tables=tables,
        max_q_len=num_tokens // num_seqs,
    )
    return AttentionMetadata(
        tokens[StepBuffers.SLOT_PAGES], tokens[StepBuffers.SLOT_OFFSETS], [], layout
    )


def _eager_lora_batch(engine: _Engine, cfg: ModelConfig, lengths: list[int]):  # type: ignore[no-untyped-def]
    """A LoRABatch of one segment per adapter (a resident adapter per slot), as the
    residency's lora_batch makes it."""
    from server.lora.backends import LORA_OPS
    from server.lora.batch import AdapterSegment, LoRABatch
    from server.lora.layout import LORA_MODULES
    from server.lora.pooled import PooledWeights

    slices = {
        (layer, m): [None] * len(parts)
        for layer in range(cfg.num_layers)
        for m, (_, parts) in enumerate(LORA_MODULES)
    }
    segments, start = [], 0
    for slot, length in enumerate(lengths):
        segments.append(AdapterSegment(start, length, slot, slot, PooledWeights(slices, {})))
        start += length
    pool = engine.pool.buffer.view(-1)
    tensors = engine.segment_buffers.fill(segments)
    return LoRABatch(segments, pool, engine.tables, LORA_OPS["triton"], tensors, engine.max_rank)


def record(model: str, dtype_name: str, shape: ServingShape) -> list[Launch]:
    """Every launch of decode-graph, eager-decode and prefill steps of `model` in `dtype_name`."""
    from server.engine.cuda_graphs import batch_buckets
    from server.lora.backends import LORA_OPS
    from server.lora.batch import LoRABatch

    cfg, dtype = MODELS[model], DTYPES[dtype_name]
    weights = _nf4_weights(cfg)
    with recording_launches() as rec, _SkipMatmuls():
        for rank in shape.max_lora_ranks:
            engine = _engine(cfg, dtype, shape, rank)
            pool_flat = engine.pool.buffer.view(-1)
            for bucket in batch_buckets(shape.max_num_seqs):
                decode_blocks = -(-shape.context // engine.block_size)
                for kind, blocks in (("decode-graph", None), ("decode-eager", decode_blocks)):
                    rec.step = f"{model} {dtype_name} {kind} b{bucket} r{rank}"
                    drive_linears(cfg, dtype, bucket, weights)
                    meta = _attention_meta(engine, bucket, bucket, blocks)
                    drive_attention(cfg, dtype, engine.pool, meta, bucket)
                    if blocks is None:
                        args = (
                            engine.tables,
                            LORA_OPS["triton"],
                            engine.segment_buffers,
                            rank,
                            bucket,
                        )
                        batch = LoRABatch.for_graph(pool_flat, *args)
                    else:
                        num_runs = min(bucket, shape.max_loras)
                        lengths = [
                            bucket // num_runs + (i < bucket % num_runs) for i in range(num_runs)
                        ]
                        batch = _eager_lora_batch(engine, cfg, lengths)
                    drive_lora(cfg, dtype, batch, bucket)
            tokens = shape.prefill_tokens
            rec.step = f"{model} {dtype_name} prefill t{tokens} r{rank}"
            drive_linears(cfg, dtype, tokens, weights)
            meta = _attention_meta(engine, 1, tokens, -(-tokens // engine.block_size))
            drive_attention(cfg, dtype, engine.pool, meta, tokens)
            drive_lora(cfg, dtype, _eager_lora_batch(engine, cfg, [tokens]), tokens)
    return rec.launches
