"""`--quantize auto`: NF4 only where the unquantized weights would crowd the device."""

from __future__ import annotations

import torch

from server.model.precision import auto_quantize

GIB = 2**30


def test_a_small_model_stays_unquantized_and_a_large_one_on_a_gpu_is_nf4() -> None:
    assert auto_quantize(135_000_000, torch.float32, 24 * GIB) == "none"  # SmolLM2 on a CPU
    assert auto_quantize(8_000_000_000, torch.bfloat16, 80 * GIB) == "nf4"  # 16 GB > 10 GB
    assert auto_quantize(4_000_000_000, torch.bfloat16, 80 * GIB) == "none"  # 8 GB <= 10 GB
    assert auto_quantize(135_000_000, torch.float32, 2 * GIB) == "nf4"  # 0.54 GB > 0.25 GB


def test_the_engine_resolves_auto_before_loading(tiny_model_dir, make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_model_dir("llama"), quantize="auto")
    assert engine.config.quantize == "none"  # a tiny model on this host
