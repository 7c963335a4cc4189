"""Training-side LoRA: trainable fp32 lora_a/lora_b on slices of the packed linears.

Applied as a module swap on a built (optionally NF4) model, driven by the same AdapterSpec the
server parses from adapter_config.json, so the trainer and the server agree on which linears
an adapter targets, at which rank and scaling. A target "q_proj" is the q slice of qkv_proj.
Norms and embeddings named by modules_to_save become trainable fp32 copies (the originals stay
untouched, e.g. a tied lm_head keeps the base embedding, as in PEFT).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import BaseModelInfo
from adapters.config import AdapterSpec, LoraTarget, parse_adapter_config
from adapters.errors import AdapterError
from adapters.format import AdapterWeights, lora_config_dict
from server.model.config import ModelConfig
from server.model.llama import PACKED_MODULES, LlamaForCausalLM
from server.training.hparams import HParams, HParamsError

# Short module -> the packed linear of our model holding it.
PACKED_OF: dict[str, str] = {
    part: packed for packed, parts in PACKED_MODULES.items() for part in parts
}


def adapter_spec(hp: HParams, base: BaseModelInfo) -> AdapterSpec:
    """The adapter a run trains, parsed by the same rules the server serves it with."""
    raw: dict[str, Any] = {
        "r": hp.r,
        "lora_alpha": hp.lora_alpha,
        "target_modules": hp.target_modules,
        "modules_to_save": hp.modules_to_save or None,
        "use_rslora": hp.use_rslora,
    }
    try:
        return parse_adapter_config(raw, base, max_lora_rank=hp.r)
    except AdapterError as exc:
        raise HParamsError(str(exc)) from exc


def peft_config(
    spec: AdapterSpec, hp: HParams, rope_scaling_factor: float, base_model_name: str | None
) -> dict[str, Any]:
    """adapter_config.json for the trained adapter: PEFT's keys plus rope_scaling_factor."""
    config = lora_config_dict(
        spec.rank,
        spec.alpha,
        spec.target_modules,
        modules_to_save=hp.modules_to_save,
        rope_scaling_factor=rope_scaling_factor,
        base_model_name_or_path=base_model_name,
    )
    return {**config, "use_rslora": hp.use_rslora, "lora_dropout": hp.lora_dropout}


@dataclass(frozen=True)
class LoRASlice:
    """One targeted short module: rows [start, start + size) of its packed linear's output."""

    module: str
    start: int
    size: int
    rank: int
    scaling: float


def slice_rows(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(start, size) of a short module's output rows within its packed linear."""
    offsets = {
        "q_proj": (0, cfg.q_size),
        "k_proj": (cfg.q_size, cfg.kv_size),
        "v_proj": (cfg.q_size + cfg.kv_size, cfg.kv_size),
        "o_proj": (0, cfg.hidden_size),
        "gate_proj": (0, cfg.intermediate_size),
        "up_proj": (cfg.intermediate_size, cfg.intermediate_size),
        "down_proj": (0, cfg.hidden_size),
    }
    return offsets[module]


class LoRATrainLinear(nn.Module):
    """A frozen base linear (float or NF4) plus trainable LoRA on some of its output slices."""

    def __init__(self, base: nn.Module, layer: int, slices: list[LoRASlice], dropout: float):
        super().__init__()
        self.base = base
        self.layer = layer
        self.slices = sorted(slices, key=lambda s: s.start)
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        device = base.weight.device
        self.lora_a = nn.ParameterDict(
            {
                s.module: nn.Parameter(torch.empty(s.rank, self.in_features, device=device))
                for s in self.slices
            }
        )
        self.lora_b = nn.ParameterDict(
            {
                s.module: nn.Parameter(torch.zeros(s.size, s.rank, device=device))
                for s in self.slices
            }
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform (a = sqrt(5)), B zeros, so the first delta is zero."""
        for s in self.slices:
            nn.init.kaiming_uniform_(self.lora_a[s.module], a=math.sqrt(5))
            nn.init.zeros_(self.lora_b[s.module])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]  ->  [..., out]; untargeted slices get no delta.
        out = self.base(x)
        h = self.dropout(x).to(torch.float32)
        parts: list[torch.Tensor] = []
        pos = 0
        for s in self.slices:
            if s.start > pos:
                parts.append(h.new_zeros(*h.shape[:-1], s.start - pos))
            # h: [..., in]  lora_a: [r, in]  lora_b: [size, r]
            shrunk = F.linear(h, self.lora_a[s.module])
            parts.append(F.linear(shrunk, self.lora_b[s.module]) * s.scaling)
            pos = s.start + s.size
        if pos < self.out_features:
            parts.append(h.new_zeros(*h.shape[:-1], self.out_features - pos))
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out + delta.to(out.dtype)


class TrainableAdapter:
    """The LoRA wrappers and saved-module copies installed in one model."""

    def __init__(
        self, spec: AdapterSpec, linears: list[LoRATrainLinear], saved: dict[str, nn.Module]
    ) -> None:
        self.spec = spec
        self.linears = linears
        self.saved = saved

    def parameters(self) -> Iterator[nn.Parameter]:
        for linear in self.linears:
            yield from linear.lora_a.values()
            yield from linear.lora_b.values()
        for module in self.saved.values():
            yield from module.parameters()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def export(self) -> AdapterWeights:
        """Float32 CPU copies keyed as the adapter format wants them."""
        lora = {}
        for linear in self.linears:
            for s in linear.slices:
                a, b = linear.lora_a[s.module], linear.lora_b[s.module]
                lora[(linear.layer, s.module)] = (_host(a), _host(b))
        saved = {name: _host(module.weight) for name, module in self.saved.items()}
        return AdapterWeights(lora=lora, saved=saved)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def apply_adapter(model: LlamaForCausalLM, spec: AdapterSpec, dropout: float) -> TrainableAdapter:
    """Freeze the model, then swap in LoRA wrappers and trainable saved-module copies."""
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    grouped: dict[tuple[int, str], list[LoraTarget]] = {}
    for t in spec.targets:
        grouped.setdefault((t.layer, PACKED_OF.get(t.module, t.module)), []).append(t)
    linears = []
    for (layer, packed), targets in grouped.items():
        block = model.model.layers[layer]
        parent = block.self_attn if hasattr(block.self_attn, packed) else block.mlp
        slices = [
            LoRASlice(t.module, *slice_rows(cfg, t.module), t.rank, t.scaling) for t in targets
        ]
        wrapper = LoRATrainLinear(getattr(parent, packed), layer, slices, dropout)
        setattr(parent, packed, wrapper)
        linears.append(wrapper)
    saved = {}
    for name in spec.saved_modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        trainable = copy.deepcopy(getattr(parent, child)).float()
        for p in trainable.parameters():
            p.requires_grad_(True)
        setattr(parent, child, trainable)
        saved[name] = trainable
    return TrainableAdapter(spec, linears, saved)
