"""Reading checkpoints: config variants, sharded weights, and clear errors for what won't load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from server.model.config import ModelConfig, ModelConfigError
from server.model.loader import CheckpointError, load_model
from server.model.tokenizer import Tokenizer, TokenizerError

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_old_style_rope_scaling_is_read():
    cfg = ModelConfig.from_dict(
        {**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    )
    assert cfg.rope_theta == 5e5
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 4.0)


def test_transformers_5_rope_parameters_are_read():
    params = {
        "rope_type": "llama3",
        "factor": 8.0,
        "rope_theta": 5e5,
        "original_max_position_embeddings": 8192,
    }
    cfg = ModelConfig.from_dict({**BASE, "rope_parameters": params})
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling.rope_type == "llama3"
    assert cfg.rope_scaling.original_max_position_embeddings == 8192


def test_unknown_architecture_is_named():
    with pytest.raises(ModelConfigError, match="unsupported architecture GPT2LMHeadModel"):
        ModelConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"]})


def test_missing_config_field_is_named():
    raw = dict(BASE)
    del raw["hidden_size"]
    with pytest.raises(ModelConfigError, match="missing required field 'hidden_size'"):
        ModelConfig.from_dict(raw)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ModelConfigError, match="unsupported rope scaling type 'yarn'"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(ModelConfigError, match="has no config.json"):
        load_model(tmp_path, torch.float32)


def test_missing_weights_are_named(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path, torch.float32)


def test_pickled_bin_weights_are_refused(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled .bin"):
        load_model(tmp_path, torch.float32)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer(tmp_path)


def test_sharded_checkpoint_loads_the_same_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen2")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single, sharded = load_model(src, torch.float32), load_model(tmp_path, torch.float32)
    for (name, a), (_, b) in zip(
        single.state_dict().items(), sharded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_tensor_with_the_wrong_shape_is_named(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    for f in ("model.safetensors", "tokenizer.json"):
        shutil.copy(src / f, tmp_path)
    raw = json.loads((src / "config.json").read_text())
    raw["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\)"):
        load_model(tmp_path, torch.float32)
