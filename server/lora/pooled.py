"""An adapter's weights written into its pool pages, and how each path reads them back.

Per packed linear, the A matrices of all its targeted slices (q, k, v or gate, up) are stacked
in one block, so the CPU path shrinks every slice with one matmul; each B is stored transposed
([rank, width]). Kernels get offsets (SliceWeights); the CPU path gets views made once here,
valid for as long as the adapter's pages stay allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.lora.layout import LORA_MODULES, SLICE_OF, Layout, plan_layout
from server.lora.ops import ModuleWeights, SliceWeights
from server.model.config import ModelConfig

if TYPE_CHECKING:
    from adapters import AdapterSpec, AdapterWeights


@dataclass
class PooledWeights:
    slices: dict[tuple[int, int], list[SliceWeights | None]]  # (layer, module) -> per slice
    modules: dict[tuple[int, int], ModuleWeights]  # (layer, module) -> views for the CPU path
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # norm name -> [hidden] view
    embed_chunks: list[int] = field(default_factory=list)  # flat offset of each row chunk
    embed_chunk_offsets: torch.Tensor | None = None  # the same offsets on the device: [chunks]
    embed_rows_per_chunk: int = 0


def _ranks_by_module(spec: AdapterSpec) -> dict[tuple[int, int], list[int]]:
    """(layer, packed module) -> rank of each slice (0 where not targeted)."""
    ranks: dict[tuple[int, int], list[int]] = {}
    for t in spec.targets:
        m, s = SLICE_OF[t.module]
        ranks.setdefault((t.layer, m), [0] * len(LORA_MODULES[m][1]))[s] = t.rank
    return ranks


def layout_adapter(spec: AdapterSpec, cfg: ModelConfig, page_numel: int) -> Layout:
    """Pages and placements for one adapter."""
    shapes = cfg.linear_shapes()
    tensors: list[tuple[tuple, int]] = []
    for (layer, m), ranks in _ranks_by_module(spec).items():
        in_features = shapes[LORA_MODULES[m][1][0]][0]
        tensors.append((("A", layer, m), sum(ranks) * in_features))
    for t in spec.targets:
        tensors.append((("B", t.layer, t.module), t.rank * t.out_features))
    embed_rows = 0
    for name in spec.saved_modules:
        if name.endswith("embed_tokens"):
            embed_rows = cfg.vocab_size
        else:
            tensors.append((("norm", name), cfg.hidden_size))
    return plan_layout(tensors, page_numel, embed_rows, cfg.hidden_size)


def write_to_pool(
    flat: torch.Tensor,
    page_numel: int,
    pages: list[int],
    layout: Layout,
    spec: AdapterSpec,
    weights: AdapterWeights,
    cfg: ModelConfig,
) -> PooledWeights:
    """Copy host weights into their pages; describe where everything went."""
    offsets = {p.key: pages[p.page] * page_numel + p.offset for p in layout.placements}
    shapes = cfg.linear_shapes()
    pooled = PooledWeights({}, {}, embed_rows_per_chunk=layout.embed_rows_per_chunk)

    for (layer, m), ranks in _ranks_by_module(spec).items():
        names = LORA_MODULES[m][1]
        in_features = shapes[names[0]][0]
        base = offsets[("A", layer, m)]
        stacked = flat[base : base + sum(ranks) * in_features].view(sum(ranks), in_features)
        per_slice: list[SliceWeights | None] = [None] * len(names)
        views = []
        row = 0
        for s, (name, rank) in enumerate(zip(names, ranks, strict=True)):
            if rank == 0:
                continue
            t = spec.target(layer, name)
            lora_a, lora_b = weights.lora[(layer, name)]  # [rank, in], [out, rank]
            stacked[row : row + rank].copy_(lora_a, non_blocking=True)
            b_off = offsets[("B", layer, name)]
            bt = flat[b_off : b_off + rank * t.out_features].view(rank, t.out_features)
            bt.copy_(lora_b.T, non_blocking=True)
            per_slice[s] = SliceWeights(base + row * in_features, b_off, rank, t.scaling)
            views.append((s, row, bt, t.scaling))
            row += rank
        pooled.slices[(layer, m)] = per_slice
        pooled.modules[(layer, m)] = ModuleWeights(stacked, tuple(views))

    embed = next((w for n, w in weights.saved.items() if n.endswith("embed_tokens")), None)
    rows = layout.embed_rows_per_chunk
    for key, offset in offsets.items():
        if key[0] == "norm":
            view = flat[offset : offset + cfg.hidden_size]
            view.copy_(weights.saved[key[1]], non_blocking=True)
            pooled.norms[key[1]] = view
    chunks = sorted((k[1], off) for k, off in offsets.items() if k[0] == "embed")
    for chunk, offset in chunks:
        assert embed is not None
        src = embed[chunk * rows : (chunk + 1) * rows]
        flat[offset : offset + src.numel()].view(src.shape).copy_(src, non_blocking=True)
    pooled.embed_chunks = [off for _, off in chunks]
    if chunks:
        pooled.embed_chunk_offsets = torch.tensor(
            pooled.embed_chunks, dtype=torch.int64, device=flat.device
        )
    return pooled
