"""Adapters saved by PEFT itself read back with the targets, scalings and tensors PEFT uses."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters import lora_config_dict, read_adapter, read_adapter_spec, write_adapter
from adapters.base import linear_name
from tests.unit.adapter_fixtures import (
    MAX_RANK,
    edit_config,
    make_peft_adapter,
    peft_lora_layers,
    saved_state,
    tiny_base,
    tiny_weights,
)

BASE = tiny_base()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations

CASES: dict[str, dict[str, Any]] = {
    "list-targets": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "regex-targets": dict(r=4, lora_alpha=16, target_modules=r".*\.(k_proj|down_proj)"),
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "rank-and-alpha-patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.k_proj": 8, "down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.1\.mlp\.(gate|up)_proj": 5},
    ),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "up_proj"]),
    "layers-to-transform": dict(
        r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1]
    ),
    "layers-pattern": dict(
        r=4, lora_alpha=8, target_modules=["v_proj"], layers_to_transform=0, layers_pattern="layers"
    ),
    "exclude-modules": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["layers.0.self_attn.v_proj"],
    ),
    "modules-to-save": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["norm", "embed_tokens"],
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_targets_ranks_and_scalings_match_peft(tmp_path: Path, case: str) -> None:
    peft_model = make_peft_adapter(tmp_path, **CASES[case])
    spec = read_adapter_spec(tmp_path, BASE, MAX_RANK)
    ours = {(t.layer, t.module): (t.rank, t.scaling) for t in spec.targets}
    assert ours == peft_lora_layers(peft_model)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tensors_equal_peft_state_dict(tmp_path: Path, case: str) -> None:
    make_peft_adapter(tmp_path, **CASES[case])
    state = saved_state(tmp_path)
    _, weights = read_adapter(tmp_path, BASE, MAX_RANK)
    expected = {}
    for (layer, module), (a, b) in weights.lora.items():
        expected[f"base_model.model.{linear_name(layer, module)}.lora_A.weight"] = a
        expected[f"base_model.model.{linear_name(layer, module)}.lora_B.weight"] = b
    for name, t in weights.saved.items():
        expected[f"base_model.model.{name}.weight"] = t
    assert expected.keys() == state.keys()
    for key, t in state.items():
        torch.testing.assert_close(expected[key], t, rtol=0, atol=0)


def test_modules_to_save_are_read_with_the_base_shapes(tmp_path: Path) -> None:
    make_peft_adapter(tmp_path, **CASES["modules-to-save"])
    spec, weights = read_adapter(tmp_path, BASE, MAX_RANK)
    assert spec.saved_modules[0] == "model.embed_tokens"
    assert weights.saved["model.embed_tokens"].shape == (320, 64)
    assert weights.saved["model.norm"].shape == (64,)
    assert len(weights.saved) == 1 + 2 * 2 + 1


def test_written_adapter_loads_in_peft_with_our_weights(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import hf_config

    weights = tiny_weights(rank=3, modules=("q_proj", "down_proj"), seed=7)
    write_adapter(tmp_path, lora_config_dict(3, 6.0, ["q_proj", "down_proj"]), weights)
    model = AutoModelForCausalLM.from_config(hf_config("llama"))
    peft_model = PeftModel.from_pretrained(model, str(tmp_path))
    for (layer, module), (a, b) in weights.lora.items():
        lora_layer = peft_model.base_model.model.get_submodule(linear_name(layer, module))
        torch.testing.assert_close(lora_layer.lora_A["default"].weight, a)
        torch.testing.assert_close(lora_layer.lora_B["default"].weight, b)
        assert lora_layer.scaling["default"] == 2.0


def test_peft_loads_a_config_carrying_rope_scaling_factor(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import hf_config

    make_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_config(tmp_path, rope_scaling_factor=4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = LoraConfig.from_pretrained(str(tmp_path))
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_config(hf_config("llama")), str(tmp_path)
        )
    assert config.r == 4
    assert any("rope_scaling_factor" in str(w.message) for w in caught)  # ignored, with a warning
    assert read_adapter_spec(tmp_path, BASE, MAX_RANK).rope_scaling_factor == 4.0


def test_peft_dora_adapter_is_refused(tmp_path: Path) -> None:
    from adapters import AdapterError

    make_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter_spec(tmp_path, BASE, MAX_RANK)


def test_overlapping_rank_patterns_resolve_in_saved_order_as_peft_loading_does(
    tmp_path: Path,
) -> None:
    # PEFT trains with the dict's order but saves keys sorted, so reloading gives layer 0's
    # q_proj rank 8 where the tensors have rank 2; PEFT's own load fails the same way.
    from adapters import AdapterError

    make_peft_adapter(
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 8},
    )
    with pytest.raises(AdapterError, match=r"shape \[2, 64\], expected \[8, 64\] \(rank 8 from"):
        read_adapter_spec(tmp_path, BASE, MAX_RANK)
