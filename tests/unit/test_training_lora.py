"""Training-side LoRA: packed slices, PEFT init, scaling, saved-module copies, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters.base import BaseModelInfo
from adapters.format import read_adapter, write_adapter
from server.model.loader import load_model
from server.training.hparams import HParamsError, hparams_for
from server.training.lora import LoRATrainLinear, adapter_spec, apply_adapter, peft_config


def _base_info(model_dir: Path) -> BaseModelInfo:
    return BaseModelInfo.from_hf_config(json.loads((model_dir / "config.json").read_text()))


def _model_with_adapter(model_dir: Path, **overrides):  # type: ignore[no-untyped-def]
    hp = hparams_for("qlora", {"quantize": "none", "r": 4, **overrides})
    spec = adapter_spec(hp, _base_info(model_dir))
    model = load_model(model_dir, torch.float32)
    torch.manual_seed(0)
    return model, apply_adapter(model, spec, dropout=0.0), hp


def _hidden(model, ids):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama")


def test_fresh_adapter_leaves_the_model_output_unchanged(model_dir):
    base = load_model(model_dir, torch.float32)
    model, adapter, _ = _model_with_adapter(model_dir)
    ids = torch.randint(3, 300, (2, 12))
    assert torch.equal(_hidden(model, ids), _hidden(base, ids))
    assert all(torch.count_nonzero(b) == 0 for lin in adapter.linears for b in lin.lora_b.values())


def test_lora_a_uses_peft_kaiming_uniform_init(model_dir):
    _, adapter, _ = _model_with_adapter(model_dir)
    for linear in adapter.linears:
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform(a=sqrt(5))
        for a in linear.lora_a.values():
            assert a.abs().max() <= bound and a.abs().max() > bound / 2
            assert a.dtype == torch.float32 and a.requires_grad


def test_all_linear_targets_every_slice_of_every_packed_linear(model_dir):
    _, adapter, _ = _model_with_adapter(model_dir)
    modules = {(lin.layer, s.module) for lin in adapter.linears for s in lin.slices}
    assert len(modules) == 2 * 7
    assert {m for _, m in modules} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_a_q_target_changes_only_the_q_rows_of_qkv_proj(model_dir):
    model, _, hp = _model_with_adapter(model_dir, target_modules=["q_proj", "v_proj"])
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoRATrainLinear)
    with torch.no_grad():
        for b in qkv.lora_b.values():
            b.normal_()
    x = torch.randn(3, qkv.in_features)
    with torch.no_grad():
        got, base = qkv(x), qkv.base(x)
    cfg = model.config
    q, k = slice(0, cfg.q_size), slice(cfg.q_size, cfg.q_size + cfg.kv_size)
    scaling = hp.lora_alpha / hp.r
    want_q = base[:, q] + scaling * x @ qkv.lora_a["q_proj"].T @ qkv.lora_b["q_proj"].T
    torch.testing.assert_close(got[:, q], want_q)
    assert torch.equal(got[:, k], base[:, k])  # k untargeted
    assert not torch.equal(got[:, cfg.q_size + cfg.kv_size :], base[:, cfg.q_size + cfg.kv_size :])


def test_rslora_scales_by_alpha_over_sqrt_r(model_dir):
    _, adapter, _ = _model_with_adapter(model_dir, use_rslora=True, r=16, lora_alpha=8)
    assert adapter.linears[0].slices[0].scaling == pytest.approx(8 / 4)


def test_only_adapter_parameters_are_trainable(model_dir):
    model, adapter, _ = _model_with_adapter(model_dir)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}


def test_saved_modules_are_trainable_copies_and_a_tied_head_keeps_the_base(tiny_model_dir):
    tied = tiny_model_dir("llama", tie_word_embeddings=True)
    model, adapter, _ = _model_with_adapter(
        tied, target_modules=["q_proj"], modules_to_save=["embed_tokens", "norm"]
    )
    assert set(adapter.saved) == {
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    }
    embed = model.model.embed_tokens.weight
    assert embed.requires_grad and model.lm_head.weight is not embed
    head_before = model.lm_head.weight.clone()
    with torch.no_grad():
        embed.add_(1.0)
    assert torch.equal(model.lm_head.weight, head_before)
    assert not model.lm_head.weight.requires_grad


def test_export_round_trips_through_the_adapter_format(model_dir, tmp_path):
    _, adapter, hp = _model_with_adapter(model_dir, modules_to_save=["norm"])
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    weights = adapter.export()
    config = peft_config(adapter.spec, hp, rope_scaling_factor=2.0, base_model_name="tiny")
    write_adapter(tmp_path, config, weights)
    spec, read = read_adapter(tmp_path, _base_info(model_dir), max_lora_rank=64)
    assert spec.rope_scaling_factor == 2.0 and spec.rank == 4
    assert set(read.lora) == set(weights.lora)
    for key, (a, b) in weights.lora.items():
        assert torch.equal(read.lora[key][0], a) and torch.equal(read.lora[key][1], b)
    assert set(read.saved) == set(weights.saved) and len(read.saved) == 5


def test_unknown_target_module_is_refused_by_name(model_dir):
    hp = hparams_for("qlora", {"target_modules": ["q_proj", "qkv"]})
    with pytest.raises(HParamsError, match="'qkv'"):
        adapter_spec(hp, _base_info(model_dir))
