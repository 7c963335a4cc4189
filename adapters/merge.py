"""Merge LoRA adapters into one (LoRAX's merged_adapters), with PEFT's add_weighted_adapter
semantics for linear, ties, dare_linear and dare_ties.

Like PEFT, A and B are merged separately: each source's weight times its scaling is split as
sqrt(|w * s|) on both factors, the sign on A's; the merged adapter has rank r, alpha r (scaling
1, or sqrt(r) when the first source uses rsLoRA, as PEFT's copied config gives) and targets
the union of the sources' targets. A module some sources lack merges only those that have it.
DARE's random pruning draws from a torch.Generator seeded by the caller, in PEFT's order
(module by module, A then B, source by source), so a given seed always gives the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.base import MODULE_ORDER, linear_name
from adapters.config import AdapterSpec, LoraTarget
from adapters.errors import AdapterError
from adapters.format import MAX_WEIGHT_ABS, AdapterWeights

MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


class MergeError(AdapterError):
    """A merge request that cannot be served; field names the part of the spec at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class MergeParams:
    """How to merge: one weight per source, the strategy, and its pruning settings."""

    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0  # fraction of values kept by ties and dare pruning
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        if self.strategy not in MERGE_STRATEGIES:
            raise MergeError(
                f"merge_strategy {self.strategy!r} is not one of {', '.join(MERGE_STRATEGIES)}",
                "merge_strategy",
            )
        if self.majority_sign_method not in SIGN_METHODS:
            raise MergeError(
                f"majority_sign_method {self.majority_sign_method!r} is not one of "
                f"{', '.join(SIGN_METHODS)}",
                "majority_sign_method",
            )
        if not (math.isfinite(self.density) and 0 < self.density <= 1):
            raise MergeError(f"density must be in (0, 1], got {self.density!r}", "density")
        if not all(math.isfinite(w) for w in self.weights):
            raise MergeError("weights must be finite numbers", "weights")


def merged_spec(names: Sequence[str], specs: Sequence[AdapterSpec]) -> AdapterSpec:
    """The spec of the merge of these adapters; MergeError when they cannot be merged."""
    assert specs and len(names) == len(specs)
    for name, spec in zip(names, specs, strict=True):
        if spec.saved_modules:
            raise MergeError(
                f"adapter {name!r} has modules_to_save weights; only LoRA weights can be merged",
                "ids",
            )
    ranks = {f"{n}: r={t.rank}" for n, s in zip(names, specs, strict=True) for t in s.targets}
    rank_values = {t.rank for s in specs for t in s.targets}
    if len(rank_values) != 1:
        raise MergeError(
            "all merged adapters must have one and the same LoRA rank in every module "
            f"(as PEFT requires for these strategies); got {', '.join(sorted(ranks))}",
            "ids",
        )
    factors = {s.rope_scaling_factor for s in specs}
    if len(factors) != 1:
        got = (f"{n}: {s.rope_scaling_factor:g}" for n, s in zip(names, specs, strict=True))
        raise MergeError(
            f"merged adapters must share one rope_scaling_factor; got {', '.join(got)}", "ids"
        )
    rank = rank_values.pop()
    use_rslora = specs[0].use_rslora
    scaling = rank / math.sqrt(rank) if use_rslora else 1.0
    keys = {(t.layer, t.module): t for s in specs for t in s.targets}
    # In (layer, LORA_MODULES) order: the order of PEFT's named_modules walk.
    targets = tuple(
        LoraTarget(t.layer, t.module, rank, float(rank), scaling, t.in_features, t.out_features)
        for t in sorted(keys.values(), key=lambda t: (t.layer, MODULE_ORDER[t.module]))
    )
    modules = tuple(sorted({t.module for t in targets}, key=MODULE_ORDER.__getitem__))
    return AdapterSpec(
        rank=rank,
        alpha=float(rank),
        use_rslora=use_rslora,
        target_modules=modules,
        targets=targets,
        saved_modules=(),
        rope_scaling_factor=factors.pop(),
        base_model_name_or_path=specs[0].base_model_name_or_path,
    )


def merge_adapters(
    names: Sequence[str],
    sources: Sequence[tuple[AdapterSpec, AdapterWeights]],
    params: MergeParams,
    seed: int,
) -> tuple[AdapterSpec, AdapterWeights]:
    """The merged adapter's spec and float32 weights (seed drives DARE's random pruning)."""
    if len(params.weights) != len(sources):
        raise MergeError(
            f"{len(sources)} adapter ids but {len(params.weights)} weights; give one weight per id",
            "weights",
        )
    spec = merged_spec(names, [s for s, _ in sources])
    # PEFT merges one adapter alone linearly, whatever the strategy asked.
    strategy = "linear" if len(sources) == 1 else params.strategy
    generator = torch.Generator().manual_seed(seed)
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for target in spec.targets:
        key = (target.layer, target.module)
        a_parts: list[torch.Tensor] = []  # each [r, in]
        b_parts: list[torch.Tensor] = []  # each [out, r]
        a_weights: list[float] = []
        b_weights: list[float] = []
        for (src_spec, weights), w in zip(sources, params.weights, strict=True):
            src = src_spec.target(*key)
            if src is None:
                continue
            lora_a, lora_b = weights.lora[key]
            scaled = w * src.scaling
            root = math.sqrt(abs(scaled))
            a_weights.append(root if scaled >= 0 else -root)  # the sign on one side only
            b_weights.append(root)
            a_parts.append(lora_a.float())
            b_parts.append(lora_b.float())
        merged_a = _combine(strategy, a_parts, a_weights, params, generator)
        merged_b = _combine(strategy, b_parts, b_weights, params, generator)
        for t in (merged_a, merged_b):
            # The bound every stored adapter meets: the pool may hold float16.
            if not bool(t.abs().max() <= MAX_WEIGHT_ABS):
                raise MergeError(
                    f"the merged weights of {linear_name(*key)} exceed +-{MAX_WEIGHT_ABS:g} "
                    "(the float16 range); use smaller weights",
                    "weights",
                )
        lora[key] = (merged_a, merged_b)
    return spec, AdapterWeights(lora=lora)


def _combine(
    strategy: str,
    tensors: list[torch.Tensor],
    weights: list[float],
    params: MergeParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties over same-shaped tensors."""
    if strategy in ("ties", "dare_ties", "dare_linear") and params.density < 1:
        if strategy == "ties":
            tensors = [_magnitude_prune(t, params.density) for t in tensors]
        else:
            tensors = [_random_prune(t, params.density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # [n, *shape]
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if strategy in ("linear", "dare_linear"):
        return (stacked * w).sum(dim=0)
    # ties: elect a sign per value on the unweighted tensors, keep the values that agree
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if params.majority_sign_method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0)
    agree = sign == majority
    kept = (stacked * w * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest magnitudes (PEFT's magnitude_based_pruning)."""
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices
    mask[top] = 1
    return t * mask.view_as(t)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each value with probability density, rescaled by 1 / density (DARE)."""
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density
