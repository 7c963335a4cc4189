"""The pool layout keeps its alignment promise, which the LoRA kernels take as a load hint.

The kernels tell the compiler that every A and Bt offset is a multiple of the slot tables'
`offset_align` (so rows load as 16-byte vectors); a false promise would be a misaligned load on
a GPU, which the CPU interpreter cannot show. So the promise is checked where it is made.
"""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterSpec, AdapterWeights
from adapters.config import LoraTarget
from bench.kernel_variants import MODELS
from server.lora.layout import LORA_MODULES, offset_alignment
from server.lora.ops import SliceWeights
from server.lora.pooled import layout_adapter, write_to_pool
from server.lora.slots import SlotTables
from server.memory.page_pool import PageGeometry
from server.model.config import ModelConfig


def _tiny(hidden: int, intermediate: int) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(
            architectures=["LlamaForCausalLM"],
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=hidden // 16,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )


def _spec(cfg: ModelConfig, ranks: list[int]) -> tuple[AdapterSpec, AdapterWeights]:
    """Every linear of every layer targeted, ranks cycling through `ranks`."""
    modules = [name for _, parts in LORA_MODULES for name in parts]
    targets, lora = [], {}
    for layer in range(cfg.num_layers):
        for i, module in enumerate(modules):
            rank = ranks[(layer + i) % len(ranks)]
            fan_in, fan_out = cfg.linear_shapes()[module]
            targets.append(LoraTarget(layer, module, rank, 2.0 * rank, 2.0, fan_in, fan_out))
            lora[layer, module] = (torch.randn(rank, fan_in), torch.randn(fan_out, rank))
    spec = AdapterSpec(max(ranks), 1.0, False, tuple(modules), tuple(targets), ())
    return spec, AdapterWeights(lora=lora)


@pytest.mark.parametrize("model", list(MODELS))
def test_real_shapes_promise_whole_64_element_lines(model):
    cfg = MODELS[model]
    for rank in (8, 16, 64):
        page_numel = PageGeometry.for_model(cfg, 16, rank).page_numel
        assert offset_alignment(cfg, page_numel) == 64


@pytest.mark.parametrize(
    ("hidden", "intermediate", "ranks"),
    [(64, 128, [1, 3, 8]), (48, 80, [2, 5]), (96, 200, [4, 7, 16])],
    ids=["aligned", "hidden-48", "intermediate-200"],
)
def test_every_offset_written_is_a_multiple_of_the_promise(hidden, intermediate, ranks):
    cfg = _tiny(hidden, intermediate)
    spec, weights = _spec(cfg, ranks)
    page_numel = PageGeometry.for_model(cfg, 16, max(ranks)).page_numel
    align = offset_alignment(cfg, page_numel)
    layout = layout_adapter(spec, cfg, page_numel)
    flat = torch.zeros((layout.num_pages + 3) * page_numel)
    pages = [3 + i for i in range(layout.num_pages)][::-1]  # not the first pages, not in order
    pooled = write_to_pool(flat, page_numel, pages, layout, spec, weights, cfg)
    offsets = [
        offset
        for per_slice in pooled.slices.values()
        for w in per_slice
        if w is not None
        for offset in (w.a_offset, w.b_offset)
    ]
    assert offsets and all(offset % align == 0 for offset in offsets)
    tables = SlotTables(cfg.num_layers, 2, torch.device("cpu"), align)
    tables.fill(1, pooled.slices)  # accepted: fill checks the promise too
    if hidden % 64:
        assert align < 64  # rows of 48 elements move a stacked A's slices off 64-element lines


def test_slot_tables_refuse_an_offset_that_breaks_the_promise():
    tables = SlotTables(1, 1, torch.device("cpu"), offset_align=16)
    with pytest.raises(AssertionError, match="alignment"):
        tables.fill(0, {(0, 1): [SliceWeights(a_offset=32, b_offset=40, rank=4, scaling=1.0)]})
