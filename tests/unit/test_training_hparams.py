"""Hyperparameters: the papers' defaults, overrides, and refusal of unknown or bad values."""

from __future__ import annotations

import pytest

from server.training.cli import parse_hparams
from server.training.hparams import HParamsError, hparams_for


def test_qlora_defaults_follow_the_paper():
    hp = hparams_for("qlora")
    assert (hp.r, hp.lora_alpha, hp.lora_dropout) == (64, 16.0, 0.1)
    assert hp.target_modules == "all-linear" and hp.quantize == "nf4"
    assert (hp.learning_rate, hp.warmup_ratio, hp.max_grad_norm) == (2e-4, 0.03, 0.3)
    assert hp.adam_beta2 == 0.999
    assert hp.batch_size * hp.gradient_accumulation_steps == 16
    assert hp.gradient_checkpointing and hp.group_by_length and not hp.train_on_prompt
    assert hp.num_warmup_steps(100) == 3
    assert hp.rope_scaling_factor(2048) == 1.0


def test_longlora_defaults_train_norms_and_embeddings_with_lora_on_attention():
    hp = hparams_for("longlora")
    assert (hp.r, hp.lora_alpha) == (8, 16.0)
    assert hp.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert hp.modules_to_save == ["embed_tokens", "norm"]
    assert hp.s2_attn and hp.s2_group_ratio == 0.25 and hp.s2_num_groups == 4
    assert hp.learning_rate == 2e-5 and hp.num_warmup_steps(1000) == 20


@pytest.mark.parametrize(
    ("context", "factor"), [(None, 2.0), (4096, 2.0), (5000, 3.0), (8192, 4.0), (1000, 1.0)]
)
def test_longlora_rope_factor_is_ceil_of_target_over_original(context, factor):
    hp = hparams_for("longlora", {"context_length": context})
    assert hp.rope_scaling_factor(2048) == factor


def test_overrides_replace_defaults():
    hp = hparams_for("qlora", {"r": 16, "learning_rate": 1, "target_modules": ["q_proj"]})
    assert hp.r == 16 and hp.learning_rate == 1.0 and isinstance(hp.learning_rate, float)
    assert hp.target_modules == ["q_proj"]
    assert hparams_for("qlora").r == 64  # defaults untouched


def test_unknown_keys_are_refused_by_name_with_a_suggestion():
    with pytest.raises(HParamsError, match="unknown hyperparameter 'lora_rank'"):
        hparams_for("qlora", {"lora_rank": 8})
    with pytest.raises(HParamsError, match="did you mean 'learning_rate'"):
        hparams_for("qlora", {"learning_rat": 1e-4})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("r", "8", "must be an integer"),
        ("r", 8.5, "must be an integer"),
        ("r", True, "must be an integer"),
        ("gradient_checkpointing", 1, "must be true or false"),
        ("learning_rate", "fast", "must be a number"),
        ("learning_rate", float("nan"), "must be a number"),
        ("target_modules", [1], "must be a list of strings or a string"),
        ("r", 0, "r must be >= 1"),
        ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
        ("learning_rate", 0, "must be > 0"),
        ("s2_group_ratio", 0.3, "must be 1/k"),
        ("quantize", "int8", "quantize must be one of nf4, none"),
        ("target_modules", [], "at least one module"),
        (
            "target_modules",
            r"(q)\1_proj",
            "target_modules .* is not a supported regular expression",
        ),
        (
            "target_modules",
            "(?=q)q_proj",
            "target_modules .* is not a supported regular expression",
        ),
        ("target_modules", "q" * 5000, "target_modules .* is 5000 characters long"),
        ("target_modules", ["q_proj"] * 5000, "target_modules may name at most"),
        ("lora_alpha", 1e30, "lora_alpha 1e\\+30 with r 64 gives a LoRA scaling"),
        ("lora_alpha", 10**400, "lora_alpha must be a number"),
    ],
)
def test_bad_values_are_refused_by_name(key, value, message):
    with pytest.raises(HParamsError, match=message):
        hparams_for("qlora", {key: value})


def test_unknown_method_is_refused():
    with pytest.raises(HParamsError, match="method must be one of qlora, longlora"):
        hparams_for("dora")
    with pytest.raises(HParamsError, match="contradicts"):
        hparams_for("qlora", {"method": "longlora"})


def test_cli_hparams_parse_as_json_else_string():
    parsed = parse_hparams(["r=16", "learning_rate=2e-4", 'target_modules=["q_proj"]'])
    assert parsed == {"r": 16, "learning_rate": 2e-4, "target_modules": ["q_proj"]}
    assert parse_hparams(["target_modules=all-linear"]) == {"target_modules": "all-linear"}
    with pytest.raises(HParamsError, match="not KEY=VALUE"):
        parse_hparams(["r16"])
