"""Merged adapters equal PEFT's add_weighted_adapter, strategy by strategy, and refuse what
PEFT cannot merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters import read_adapter
from adapters.merge import MergeError, MergeParams, merge_adapters
from tests.unit.adapter_fixtures import _LORA_MODULE_NAME, MAX_RANK, make_peft_adapter, tiny_base

BASE = tiny_base()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# One rank, different alphas, targets and scalings (rsLoRA): what the merge must fold in.
SOURCES: dict[str, dict[str, Any]] = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "c": dict(r=4, lora_alpha=2, target_modules="all-linear"),
}
SEED = 1234


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    for i, (name, lora) in enumerate(SOURCES.items()):
        make_peft_adapter(root / name, seed=i, **lora)
    return {name: root / name for name in SOURCES}


def peft_merge(
    dirs: dict[str, Path], names: list[str], weights: list[float], **kwargs: Any
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, module) -> (lora_A, lora_B, scaling) of PEFT's merged adapter 'merged'."""
    import peft.tuners.lora.model as peft_lora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import hf_config

    base = AutoModelForCausalLM.from_config(hf_config("llama"))
    model = PeftModel.from_pretrained(base, str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    # DARE draws from the global generator in PEFT, after the new adapter's random init:
    # seed it between the two (_freeze_adapter runs right before the merge loop).
    freeze = peft_lora._freeze_adapter

    def freeze_then_seed(*args: Any) -> None:
        freeze(*args)
        torch.manual_seed(SEED)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peft_lora, "_freeze_adapter", freeze_then_seed)
        model.add_weighted_adapter(names, weights, "merged", **kwargs)
    result = {}
    for module_name, module in model.named_modules():
        match = _LORA_MODULE_NAME.match(module_name)
        if match and "merged" in getattr(module, "lora_A", {}):
            key = int(match.group(1)), match.group(2)
            a = module.lora_A["merged"].weight.detach()
            b = module.lora_B["merged"].weight.detach()
            result[key] = (a, b, module.scaling["merged"])
    return result


def our_merge(dirs: dict[str, Path], names: list[str], params: MergeParams):  # type: ignore[no-untyped-def]
    sources = [read_adapter(dirs[n], BASE, MAX_RANK) for n in names]
    return merge_adapters(names, sources, params, seed=SEED)


CASES: dict[str, dict[str, Any]] = {
    "linear": dict(combination_type="linear"),
    "ties-total": dict(combination_type="ties", density=0.5),
    "ties-frequency": dict(combination_type="ties", density=0.3, majority_sign_method="frequency"),
    "dare_linear": dict(combination_type="dare_linear", density=0.6),
    "dare_ties": dict(combination_type="dare_ties", density=0.4),
    "dare_ties-frequency": dict(
        combination_type="dare_ties", density=0.7, majority_sign_method="frequency"
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_merge_equals_peft_add_weighted_adapter(adapter_dirs: dict[str, Path], case: str) -> None:
    kwargs = CASES[case]
    names, weights = ["a", "b", "c"], [0.7, -0.4, 1.3]
    reference = peft_merge(adapter_dirs, names, weights, **kwargs)
    params = MergeParams(
        weights=tuple(weights),
        strategy=kwargs["combination_type"],
        density=kwargs.get("density", 1.0),
        majority_sign_method=kwargs.get("majority_sign_method", "total"),
    )
    spec, merged = our_merge(adapter_dirs, names, params)
    assert {(t.layer, t.module) for t in spec.targets} == set(reference)
    for t in spec.targets:
        a, b, scaling = reference[t.layer, t.module]
        ours_a, ours_b = merged.lora[t.layer, t.module]
        assert t.scaling == pytest.approx(scaling)
        torch.testing.assert_close(ours_a, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_b, b, rtol=1e-5, atol=1e-6)


def test_one_adapter_merges_linearly_whatever_the_strategy(adapter_dirs: dict[str, Path]) -> None:
    reference = peft_merge(adapter_dirs, ["b"], [0.5], combination_type="ties", density=0.2)
    _, merged = our_merge(adapter_dirs, ["b"], MergeParams((0.5,), "ties", density=0.2))
    for key, (a, b, _) in reference.items():
        torch.testing.assert_close(merged.lora[key][0], a)
        torch.testing.assert_close(merged.lora[key][1], b)


def test_dare_pruning_is_fixed_by_the_seed(adapter_dirs: dict[str, Path]) -> None:
    names = ["a", "c"]
    sources = [read_adapter(adapter_dirs[n], BASE, MAX_RANK) for n in names]
    params = MergeParams((1.0, 1.0), "dare_linear", density=0.5)
    _, first = merge_adapters(names, sources, params, seed=7)
    _, again = merge_adapters(names, sources, params, seed=7)
    _, other = merge_adapters(names, sources, params, seed=8)
    key = (0, "q_proj")
    assert torch.equal(first.lora[key][0], again.lora[key][0])
    assert not torch.equal(first.lora[key][0], other.lora[key][0])


def test_different_ranks_are_refused_naming_each(tmp_path: Path) -> None:
    make_peft_adapter(tmp_path / "r4", r=4, lora_alpha=8, target_modules=["q_proj"])
    make_peft_adapter(tmp_path / "r8", r=8, lora_alpha=8, target_modules=["q_proj"])
    sources = [read_adapter(tmp_path / n, BASE, MAX_RANK) for n in ("r4", "r8")]
    with pytest.raises(MergeError, match=r"same LoRA rank.*r4: r=4, r8: r=8") as err:
        merge_adapters(["r4", "r8"], sources, MergeParams((1.0, 1.0)), seed=0)
    assert err.value.field == "ids"


def test_modules_to_save_are_refused(tmp_path: Path) -> None:
    make_peft_adapter(tmp_path / "s", r=4, target_modules=["q_proj"], modules_to_save=["norm"])
    sources = [read_adapter(tmp_path / "s", BASE, MAX_RANK)]
    with pytest.raises(MergeError, match="'s' has modules_to_save"):
        merge_adapters(["s"], sources, MergeParams((1.0,)), seed=0)


def test_weights_must_match_the_ids(adapter_dirs: dict[str, Path]) -> None:
    sources = [read_adapter(adapter_dirs["a"], BASE, MAX_RANK)]
    with pytest.raises(MergeError, match="1 adapter ids but 2 weights") as err:
        merge_adapters(["a"], sources, MergeParams((1.0, 2.0)), seed=0)
    assert err.value.field == "weights"


def test_merged_weights_beyond_float16_are_refused(adapter_dirs: dict[str, Path]) -> None:
    sources = [read_adapter(adapter_dirs["a"], BASE, MAX_RANK)]
    with pytest.raises(MergeError, match="exceed") as err:
        merge_adapters(["a"], sources, MergeParams((1e12,)), seed=0)
    assert err.value.field == "weights"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(strategy="svd"), "merge_strategy"),
        (dict(majority_sign_method="mean"), "majority_sign_method"),
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(weights=(float("nan"),)), "weights"),
    ],
)
def test_bad_params_name_their_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(MergeError) as err:
        MergeParams(**{"weights": (1.0,), **kwargs})
    assert err.value.field == field
