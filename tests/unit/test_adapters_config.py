"""adapter_config.json parsing: PEFT's matching rules, our extension, and every refusal."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from adapters import AdapterError, AdapterSpec, BaseModelInfo, parse_adapter_config
from adapters.config import MAX_SCALING
from adapters.matching import MAX_PATTERN_CHARS, MAX_PATTERNS
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base

BASE = tiny_base()


def parse(**config: Any) -> AdapterSpec:
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    raw.update(config)
    return parse_adapter_config(raw, BASE, MAX_RANK)


def refused(match: str, **config: Any) -> None:
    with pytest.raises(AdapterError, match=match):
        parse(**config)


def keys(spec: AdapterSpec) -> list[tuple[int, str]]:
    return [(t.layer, t.module) for t in spec.targets]


# ---- base model ----------------------------------------------------------------------------


def test_base_info_from_hf_config_uses_grouped_query_shapes() -> None:
    assert BASE.linear_shapes["q_proj"] == (64, 64)
    assert BASE.linear_shapes["k_proj"] == (64, 32)  # 2 kv heads of 16
    assert BASE.linear_shapes["down_proj"] == (128, 64)
    assert (BASE.num_layers, BASE.hidden_size, BASE.vocab_size) == (2, 64, 320)


def test_base_info_without_a_linear_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks o_proj, gate_proj, up_proj, down_proj"):
        BaseModelInfo(2, 64, 320, {m: (64, 64) for m in ("q_proj", "k_proj", "v_proj")})


# ---- targets -------------------------------------------------------------------------------


def test_list_targets_cover_every_layer_sorted_by_layer_then_module() -> None:
    spec = parse(target_modules=["v_proj", "q_proj"])
    assert keys(spec) == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    assert spec.target_modules == ("q_proj", "v_proj")


def test_list_entry_may_be_a_dotted_suffix_or_a_full_name() -> None:
    spec = parse(target_modules=["mlp.down_proj", "model.layers.1.self_attn.o_proj"])
    assert keys(spec) == [(0, "down_proj"), (1, "o_proj"), (1, "down_proj")]


def test_target_string_is_a_regex_full_match_on_module_names() -> None:
    spec = parse(target_modules=r".*\.1\.self_attn\.(k|v)_proj")
    assert keys(spec) == [(1, "k_proj"), (1, "v_proj")]


def test_target_string_that_is_only_a_short_name_matches_nothing() -> None:
    refused("targets no module", target_modules="q_proj")


def test_all_linear_targets_every_linear_except_lm_head() -> None:
    spec = parse(target_modules="all-linear")
    assert len(spec.targets) == 2 * 7
    assert spec.target_modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


def test_missing_target_modules_defaults_to_peft_llama_q_and_v() -> None:
    spec = parse_adapter_config({"r": 2, "lora_alpha": 4}, BASE, MAX_RANK)
    assert spec.target_modules == ("q_proj", "v_proj")


def test_exclude_modules_list_drops_suffix_matches() -> None:
    spec = parse(target_modules="all-linear", exclude_modules=["mlp.down_proj", "q_proj"])
    assert "down_proj" not in spec.target_modules
    assert "q_proj" not in spec.target_modules


def test_exclude_modules_regex_drops_full_matches() -> None:
    spec = parse(exclude_modules=r"model\.layers\.0\..*")
    assert keys(spec) == [(1, "q_proj"), (1, "v_proj")]


def test_layers_to_transform_limits_layers() -> None:
    spec = parse(layers_to_transform=[1])
    assert keys(spec) == [(1, "q_proj"), (1, "v_proj")]


def test_layers_to_transform_int_with_layers_pattern() -> None:
    spec = parse(layers_to_transform=0, layers_pattern="layers")
    assert keys(spec) == [(0, "q_proj"), (0, "v_proj")]


def test_layers_pattern_that_never_matches_targets_nothing() -> None:
    refused("targets no module", layers_to_transform=[0], layers_pattern="blocks")


def test_layers_to_transform_beyond_the_base_is_refused() -> None:
    refused("names layer 5, but the base model has 2 layers", layers_to_transform=[0, 5])


def test_layers_to_transform_with_regex_targets_is_refused() -> None:
    refused(
        "cannot be used when target_modules is a str", target_modules=".*", layers_to_transform=[0]
    )


def test_layers_pattern_without_layers_to_transform_is_refused() -> None:
    refused("layers_pattern needs layers_to_transform", layers_pattern="layers")


def test_unknown_target_module_is_named() -> None:
    refused("target module 'c_attn' does not exist", target_modules=["q_proj", "c_attn"])


def test_config_that_targets_nothing_is_refused() -> None:
    refused("targets no module", exclude_modules=["q_proj", "v_proj"])


def test_lora_on_lm_head_is_refused() -> None:
    refused("LoRA on lm_head is not supported", target_modules=["q_proj", "lm_head"])


def test_lora_on_embed_tokens_is_refused() -> None:
    refused("LoRA on embed_tokens is not supported", target_modules=["embed_tokens"])


def test_target_that_matches_a_norm_is_refused() -> None:
    refused(
        "'model.layers.0.input_layernorm', which is not a linear",
        target_modules=["input_layernorm"],
    )


def test_invalid_target_regex_is_named() -> None:
    refused(r"target_modules '\(q' is not a supported regular expression", target_modules="(q")


# ---- ranks and scaling ---------------------------------------------------------------------


def test_scaling_is_alpha_over_rank() -> None:
    spec = parse(r=4, lora_alpha=8)
    assert {t.scaling for t in spec.targets} == {2.0}
    assert spec.max_rank == 4


def test_rslora_scaling_is_alpha_over_sqrt_rank() -> None:
    spec = parse(r=4, lora_alpha=8, use_rslora=True)
    assert {t.scaling for t in spec.targets} == {4.0}


def test_rank_and_alpha_patterns_override_per_module() -> None:
    spec = parse(
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 8},
        alpha_pattern={"v_proj": 3},
    )
    assert spec.target(0, "q_proj").rank == 2
    assert spec.target(1, "down_proj").rank == 8
    assert spec.target(0, "down_proj").rank == 4
    assert spec.target(0, "v_proj").scaling == 3 / 4
    assert spec.target(0, "q_proj").scaling == 8 / 2
    assert spec.max_rank == 8


def test_first_matching_rank_pattern_key_wins() -> None:
    spec = parse(rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 8})
    assert spec.target(0, "q_proj").rank == 2


def test_rank_above_max_is_refused_naming_the_limit_and_flag() -> None:
    refused(f"r is rank 32, above the server's maximum LoRA rank {MAX_RANK}.*--max-lora-rank", r=32)


def test_rank_pattern_above_max_is_refused_naming_the_module() -> None:
    refused(r"rank_pattern\['v_proj'\] is rank 64.*--max-lora-rank", rank_pattern={"v_proj": 64})


def test_zero_rank_is_refused() -> None:
    refused("r must be >= 1, got 0", r=0)


def test_non_integer_rank_is_refused() -> None:
    refused("r must be an integer rank", r=4.5)


def test_non_positive_alpha_is_refused() -> None:
    refused("lora_alpha must be positive, got 0", lora_alpha=0)


def test_nan_alpha_is_refused() -> None:
    refused(
        "alpha_pattern\\['q_proj'\\] must be a finite number", alpha_pattern={"q_proj": math.nan}
    )


# ---- modules_to_save -----------------------------------------------------------------------


def test_modules_to_save_norm_matches_every_norm_by_suffix() -> None:
    spec = parse(modules_to_save=["norm"])
    assert spec.saved_modules == (
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    )


def test_modules_to_save_embed_tokens_counts_its_parameters() -> None:
    spec = parse(modules_to_save=["embed_tokens"])
    assert spec.saved_modules == ("model.embed_tokens",)
    assert spec.num_saved_params == 320 * 64
    assert spec.num_params == spec.num_lora_params + 320 * 64


def test_lm_head_in_modules_to_save_is_refused() -> None:
    refused(
        "lm_head in modules_to_save is not supported", modules_to_save=["embed_tokens", "lm_head"]
    )


def test_modules_to_save_of_a_linear_is_refused() -> None:
    refused("only norm layers and embed_tokens can be saved", modules_to_save=["o_proj"])


def test_modules_to_save_entry_matching_nothing_is_named() -> None:
    refused("modules_to_save entry 'score' matches no module", modules_to_save=["score"])


# ---- refused features ----------------------------------------------------------------------


def test_dora_is_refused() -> None:
    refused(r"DoRA adapters \(use_dora: true\) are not supported", use_dora=True)


def test_lora_bias_is_refused() -> None:
    refused(r"LoRA bias \(lora_bias: true\) is not supported", lora_bias=True)


def test_bias_other_than_none_is_refused() -> None:
    refused("bias 'lora_only' is not supported", bias="lora_only")


def test_fan_in_fan_out_is_refused() -> None:
    refused("fan_in_fan_out: true .* is not supported", fan_in_fan_out=True)


def test_layer_replication_is_refused() -> None:
    refused("layer_replication is not supported", layer_replication=[[0, 2]])


def test_target_parameters_is_refused() -> None:
    refused("target_parameters .* is not supported", target_parameters=["mlp.experts.weight"])


def test_trainable_token_indices_is_refused() -> None:
    refused("trainable_token_indices is not supported", trainable_token_indices=[1, 2])


def test_lora_variant_is_refused() -> None:
    refused("alora_invocation_tokens is set: this LoRA variant", alora_invocation_tokens=[5])


def test_non_lora_peft_type_is_refused() -> None:
    refused("peft_type 'IA3' is not supported", peft_type="IA3")


def test_peft_type_is_case_insensitive() -> None:
    assert parse(peft_type="lora").rank == 4


def test_non_causal_lm_task_type_is_refused() -> None:
    refused("task_type 'SEQ_CLS' is not supported", task_type="SEQ_CLS")


def test_inference_irrelevant_keys_are_ignored() -> None:
    spec = parse(
        lora_dropout=0.1,
        init_lora_weights="gaussian",
        inference_mode=False,
        task_type=None,
        revision="main",
        peft_version="0.21.2",
        some_future_key={"x": 1},
    )
    assert spec.rank == 4


# ---- extension and serialization -----------------------------------------------------------


def test_rope_scaling_factor_defaults_to_one() -> None:
    assert parse().rope_scaling_factor == 1.0


def test_rope_scaling_factor_is_read() -> None:
    assert parse(rope_scaling_factor=4).rope_scaling_factor == 4.0


def test_rope_scaling_factor_below_one_is_refused() -> None:
    refused("rope_scaling_factor must be a number >= 1", rope_scaling_factor=0.5)


def test_spec_round_trips_through_its_dict() -> None:
    spec = parse(rank_pattern={"q_proj": 2}, modules_to_save=["norm"], rope_scaling_factor=2.0)
    assert AdapterSpec.from_dict(spec.to_dict()) == spec


def test_targets_in_layer_lists_one_layers_targets() -> None:
    spec = parse(target_modules="all-linear")
    assert [t.module for t in spec.targets_in_layer(1)][:2] == ["q_proj", "k_proj"]
    assert len(spec.targets_in_layer(1)) == 7


# ---- untrusted patterns and numbers --------------------------------------------------------

REDOS = "(.*)*(.*)*(.*)*(.*)*Z"


@pytest.mark.parametrize(
    ("field", "config"),
    [
        ("rank_pattern key", {"rank_pattern": {r"(q)\1_proj": 2}}),
        ("alpha_pattern key", {"alpha_pattern": {"(?<=self_attn.)q_proj": 2}}),
        ("target_modules", {"target_modules": "(?=q)q_proj"}),
        ("exclude_modules", {"exclude_modules": r"(q)\1"}),
        ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": r"(l)\1"}),
        ("target_modules", {"target_modules": r"\pL{1000}"}),  # RE2 program over max_mem
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_naming_its_field(field: str, config: Any) -> None:
    refused(f"^{field} .* is not a supported regular expression", **config)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules"])
def test_catastrophic_backtracking_pattern_is_refused_in_linear_time(field: str) -> None:
    config = {field: REDOS} if field == "target_modules" else {field: {REDOS: 8}}
    start = time.perf_counter()
    refused(field, **config)
    assert time.perf_counter() - start < 0.5


def test_a_pattern_key_that_matches_no_targeted_module_is_refused() -> None:
    refused(
        "rank_pattern key 'k_proj' matches no module this adapter targets",
        rank_pattern={"k_proj": 2},
    )


def test_an_overly_long_pattern_is_refused() -> None:
    refused("target_modules 'qqq.* is 5000 characters long", target_modules="q" * 5000)


def test_too_many_pattern_keys_are_refused() -> None:
    keys = {f"layers\\.{i}\\.self_attn\\.q_proj": 2 for i in range(MAX_PATTERNS + 1)}
    refused(
        f"rank_pattern has {MAX_PATTERNS + 1} patterns; at most {MAX_PATTERNS}", rank_pattern=keys
    )


def test_regex_semantics_match_peft_under_re2() -> None:
    spec = parse(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.1\..*")
    assert keys(spec) == [(0, "q_proj"), (0, "v_proj")]
    spec = parse(layers_to_transform=[1], layers_pattern="layers")
    assert keys(spec) == [(1, "q_proj"), (1, "v_proj")]


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, 10**400])
def test_non_finite_alpha_is_refused(alpha: float) -> None:
    refused("lora_alpha must be a finite number", lora_alpha=alpha)


def test_alpha_giving_a_huge_scaling_is_refused_naming_lora_alpha() -> None:
    refused(r"lora_alpha 1e\+30 with r 4 gives .* beyond the supported range", lora_alpha=1e30)


def test_scaling_bound_applies_to_pattern_overrides_and_rslora() -> None:
    refused(r"alpha_pattern\['v_proj'\] 8192 with r 4", alpha_pattern={"v_proj": 8192})
    refused(
        r"lora_alpha 4000 with rank_pattern\['q_proj'\] 1 .*lora_alpha / rank_pattern",
        lora_alpha=4000,
        r=8,
        rank_pattern={"q_proj": 1},
    )
    refused(r"lora_alpha / sqrt\(r\)", lora_alpha=4096, r=4, use_rslora=True)


def test_scaling_at_the_bound_is_accepted() -> None:
    spec = parse(r=4, lora_alpha=4 * MAX_SCALING)
    assert {t.scaling for t in spec.targets} == {MAX_SCALING}


def test_huge_values_in_messages_are_shortened() -> None:
    with pytest.raises(AdapterError) as info:
        parse(bias="x" * 100_000)
    assert len(str(info.value)) < 300


def test_the_most_and_longest_pattern_keys_allowed_parse_quickly() -> None:
    padding = "y" * (MAX_PATTERN_CHARS - 16)
    keys = {f"{i:04d}[a-z]{{1000}}{padding}": 2 for i in range(MAX_PATTERNS)}
    assert max(map(len, keys)) <= MAX_PATTERN_CHARS
    start = time.perf_counter()
    refused("rank_pattern key .* matches no module", rank_pattern=keys, alpha_pattern=keys)
    assert time.perf_counter() - start < 5
