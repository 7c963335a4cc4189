"""Hyperparameters: the papers' defaults, overrides, and refusal of unknown or bad values."""

from __future__ import annotations

import pytest

from server.training.cli import parse_hparams
from server.training.hparams import ALIASES, HParamsError, hparams_for


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
    with pytest.raises(HParamsError, match="unknown hyperparameter 'lora_rnak'"):
        hparams_for("qlora", {"lora_rnak": 8})
    with pytest.raises(HParamsError, match="did you mean 'learning_rate'"):
        hparams_for("qlora", {"learning_rat": 1e-4})


@pytest.mark.parametrize(
    ("key", "suggested"),
    [
        ("lora_rnak", "'lora_rank' (an alias of 'r')"),
        ("lora_rr", "'lora_r' (an alias of 'r')"),
        ("n_epoch", "'n_epochs' (an alias of 'num_epochs')"),
        ("num_epoch", "'num_epochs'"),
        ("learning_rate_multiplyer", "'learning_rate_multiplier'"),
        ("lora_alhpa", "'lora_alpha'"),
    ],
)
def test_a_near_miss_names_the_right_hyperparameter_or_alias(key, suggested):
    with pytest.raises(HParamsError) as info:
        hparams_for("qlora", {key: 1})
    assert str(info.value) == f"unknown hyperparameter {key!r}; did you mean {suggested}?"


def test_a_name_nothing_resembles_gets_no_suggestion():
    with pytest.raises(HParamsError) as info:
        hparams_for("qlora", {"xyzzy": 1})
    assert str(info.value) == "unknown hyperparameter 'xyzzy'"


@pytest.mark.parametrize(
    ("alias", "value", "field"),
    [
        ("lora_r", 8, "r"),
        ("lora_rank", 8, "r"),
        ("n_epochs", 3, "num_epochs"),
        ("num_train_epochs", 3, "num_epochs"),
        ("per_device_train_batch_size", 2, "batch_size"),
        ("micro_batch_size", 2, "batch_size"),
        ("lora_target_modules", ["q_proj"], "target_modules"),
        ("sequence_len", 128, "max_seq_len"),
        ("max_seq_length", 128, "max_seq_len"),
    ],
)
def test_aliases_set_the_hyperparameter_they_name(alias, value, field):
    assert ALIASES[alias] == field
    assert getattr(hparams_for("qlora", {alias: value}), field) == value


def test_an_alias_is_checked_like_the_name_it_stands_for():
    with pytest.raises(HParamsError, match="hyperparameter r must be >= 1, got 0"):
        hparams_for("qlora", {"lora_r": 0})


def test_an_alias_and_its_name_together_are_refused():
    with pytest.raises(HParamsError, match="r and lora_r name the same setting"):
        hparams_for("qlora", {"r": 8, "lora_r": 8})


@pytest.mark.parametrize(
    "key", ["batch_size", "n_epochs", "num_epochs", "learning_rate_multiplier"]
)
def test_auto_means_the_methods_default(key):
    assert hparams_for("longlora", {key: "auto"}) == hparams_for("longlora")


def test_auto_elsewhere_is_refused_as_a_wrong_type():
    with pytest.raises(HParamsError, match="hyperparameter r must be an integer, got 'auto'"):
        hparams_for("qlora", {"r": "auto"})


@pytest.mark.parametrize(("method", "default"), [("qlora", 2e-4), ("longlora", 2e-5)])
def test_learning_rate_multiplier_scales_the_methods_default(method, default):
    hp = hparams_for(method, {"learning_rate_multiplier": 0.5})
    assert hp.learning_rate == pytest.approx(default * 0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate_multiplier": 0}, "must be a number > 0 or 'auto', got 0"),
        ({"learning_rate_multiplier": "2"}, "must be a number > 0 or 'auto', got '2'"),
        (
            {"learning_rate_multiplier": 2, "learning_rate": 1e-4},
            "give learning_rate or learning_rate_multiplier, not both",
        ),
    ],
)
def test_bad_learning_rate_multipliers_are_refused(overrides, message):
    with pytest.raises(HParamsError, match=message):
        hparams_for("qlora", overrides)


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
