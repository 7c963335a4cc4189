"""Load a local Hugging Face checkpoint directory into LlamaForCausalLM (and save one back).

Weights come from `model.safetensors` or the shards listed in `model.safetensors.index.json`.
Pickled `.bin` checkpoints are refused: loading them would run arbitrary code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from server.model.config import ModelConfig
from server.model.llama import PACKED_MODULES, LlamaForCausalLM

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or holds tensors that do not fit the model."""


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the checkpoint, in shard order."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return [model_dir / f for f in files]
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")):
        raise CheckpointError(
            f"{model_dir} holds only pickled .bin weights, which loraplex refuses to load; "
            "convert them to model.safetensors"
        )
    raise CheckpointError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_tensor(name)


def _packed_target(name: str, cfg: ModelConfig) -> tuple[str, int, int] | None:
    """Checkpoint name of a packed slice -> (our name, row start, row count)."""
    sizes = {
        "q_proj": (0, cfg.q_size),
        "k_proj": (cfg.q_size, cfg.kv_size),
        "v_proj": (cfg.q_size + cfg.kv_size, cfg.kv_size),
        "gate_proj": (0, cfg.intermediate_size),
        "up_proj": (cfg.intermediate_size, cfg.intermediate_size),
    }
    for packed, parts in PACKED_MODULES.items():
        for part in parts:
            marker = f".{part}."
            if marker in name:
                start, rows = sizes[part]
                return name.replace(marker, f".{packed}."), start, rows
    return None


def load_model(model_dir: str | Path, dtype: torch.dtype) -> LlamaForCausalLM:
    """Build the model from config.json and fill it from the checkpoint, on the CPU."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for name, tensor in _iter_checkpoint(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        packed = _packed_target(name, cfg)
        target = packed[0] if packed else name
        if target not in expected:
            raise CheckpointError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
        want = expected[target].shape
        if packed is None:
            if tensor.shape != want:
                raise CheckpointError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(want)}"
                )
            state[target] = tensor.to(dtype)
            continue
        _, start, rows = packed
        if tensor.shape != (rows, *want[1:]):
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {(rows, *want[1:])}"
            )
        buf = state.setdefault(target, torch.empty(want, dtype=dtype))
        buf[start : start + rows] = tensor
        filled[target] = filled.get(target, 0) + rows
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    incomplete = [n for n, rows in filled.items() if rows != expected[n].shape[0]]
    missing = sorted(set(expected) - set(state)) + incomplete
    if missing:
        raise CheckpointError(f"checkpoint is missing weights for: {', '.join(missing[:8])}")
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = type(model.model.rotary)(cfg)  # buffers were built on meta
    return model.eval()


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's float weights under the checkpoint's names (packed modules split back)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for packed, parts in PACKED_MODULES.items():
            if f".{packed}." in name:
                sizes = (
                    [cfg.q_size, cfg.kv_size, cfg.kv_size]
                    if packed == "qkv_proj"
                    else [cfg.intermediate_size] * 2
                )
                for part, chunk in zip(parts, tensor.split(sizes, dim=0), strict=True):
                    out[name.replace(f".{packed}.", f".{part}.")] = chunk.contiguous()
                break
        else:
            out[name] = tensor.contiguous()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_checkpoint(model: LlamaForCausalLM, model_dir: str | Path, config: dict) -> None:
    """Write config.json and model.safetensors in the Hugging Face layout."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu() for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, counting 4-bit quantization state."""
    total = 0
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += quant_state_bytes(state)
    return total


def quant_state_bytes(state: object) -> int:
    """Bytes of a bitsandbytes QuantState: absmax, the NF4 code table, nested statistics."""
    total = 0
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total
