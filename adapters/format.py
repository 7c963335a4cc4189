"""Read and write PEFT adapters: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
(some PEFT versions add the adapter name: `.lora_A.default.weight`); modules_to_save weights
are `base_model.model.<module>.weight`. Pickled `adapter_model.bin` files are never opened.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adapters.base import BaseModelInfo, linear_name, parse_linear_name
from adapters.chat_template import TOKENIZER_FILES, read_chat_template
from adapters.config import AdapterSpec, parse_adapter_config
from adapters.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # required
ALL_FILES = ADAPTER_FILES + TOKENIZER_FILES  # and the optional ones kept with them
PICKLE_REFUSED = "pickled .bin adapters are refused; convert to safetensors"

_PREFIX = "base_model.model."
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.([^.]+))?\.weight")
_SAVED_KEY = re.compile(r"base_model\.model\.(.+?)(?:\.modules_to_save\.([^.]+))?\.weight")
# The largest float16 value: weights must survive the cast to any served dtype.
MAX_WEIGHT_ABS = 65504.0
_MAX_NAMED = 3  # unexpected keys quoted in an error message

# Where a safetensors key goes: ("A" | "B", layer, module) or ("saved", full module name).
Placement = tuple[Any, ...]


@dataclass
class AdapterWeights:
    """An adapter's tensors on the host, keyed the way the engine consumes them."""

    # (layer, short module) -> (lora_a [r, in], lora_b [out, r])
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # full module name -> [hidden] for norms, [vocab, hidden] for embed_tokens
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor, LoRA pairs first."""
        for a, b in self.lora.values():
            yield a
            yield b
        yield from self.saved.values()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def to(self, dtype: torch.dtype) -> AdapterWeights:
        """A copy in dtype (self when it already is)."""
        if all(t.dtype == dtype for t in self.tensors()):
            return self
        return AdapterWeights(
            lora={k: (a.to(dtype), b.to(dtype)) for k, (a, b) in self.lora.items()},
            saved={k: t.to(dtype) for k, t in self.saved.items()},
        )

    def pin_memory(self) -> AdapterWeights:
        """A copy in page-locked memory, so copies to the GPU can be asynchronous."""
        return AdapterWeights(
            lora={k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in self.lora.items()},
            saved={k: t.pin_memory() for k, t in self.saved.items()},
        )


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuse a directory without both adapter files, or with only pickled weights."""
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise AdapterError(f"{adapter_dir} has no {CONFIG_FILE}")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        if (adapter_dir / PICKLED_WEIGHTS_FILE).exists():
            raise AdapterError(PICKLE_REFUSED)
        raise AdapterError(f"{adapter_dir} has no {WEIGHTS_FILE}")


def load_config(data: bytes | str) -> dict[str, Any]:
    """Parse adapter_config.json contents."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and integers past Python's digit limit.
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return raw


def read_adapter_spec(adapter_dir: Path, base: BaseModelInfo, max_lora_rank: int) -> AdapterSpec:
    """Validate the config and the safetensors header (no tensor data) and return the spec."""
    spec, _ = _read(adapter_dir, base, max_lora_rank, load=False)
    return spec


def read_adapter(
    adapter_dir: Path, base: BaseModelInfo, max_lora_rank: int, check_values: bool = True
) -> tuple[AdapterSpec, AdapterWeights]:
    """Validate an adapter and return its spec and float32 weights.

    check_values=False skips the scan for NaN/Inf, for adapters the store has already checked
    (re-reading an evicted adapter then costs the read, not another pass over every value).
    """
    spec, weights = _read(adapter_dir, base, max_lora_rank, load=True, check_values=check_values)
    assert weights is not None
    return spec, weights


def write_adapter(adapter_dir: Path, config: Mapping[str, Any], weights: AdapterWeights) -> None:
    """Write an adapter in PEFT's layout (loadable by peft's PeftModel.from_pretrained)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), (a, b) in weights.lora.items():
        name = linear_name(layer, module)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = _to_save(a)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = _to_save(b)
    for name, t in weights.saved.items():
        tensors[f"{_PREFIX}{name}.weight"] = _to_save(t)
    save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))


def lora_config_dict(
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    *,
    modules_to_save: Sequence[str] | None = None,
    rope_scaling_factor: float = 1.0,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """A minimal PEFT adapter_config.json for a plain LoRA adapter (e.g. a training result)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(target_modules),
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if modules_to_save:
        config["modules_to_save"] = list(modules_to_save)
    if rope_scaling_factor != 1.0:
        config["rope_scaling_factor"] = rope_scaling_factor
    return config


def _to_save(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _read(
    adapter_dir: Path,
    base: BaseModelInfo,
    max_lora_rank: int,
    load: bool,
    check_values: bool = True,
) -> tuple[AdapterSpec, AdapterWeights | None]:
    check_adapter_dir(adapter_dir)
    spec = parse_adapter_config(
        load_config((adapter_dir / CONFIG_FILE).read_bytes()), base, max_lora_rank
    )
    # Registration (load and check_values) checks the tokenizer files; re-reads trust them.
    template = read_chat_template(adapter_dir, base.vocabulary, check=load and check_values)
    if template is not None:
        spec = dataclasses.replace(spec, chat_template=template)
    try:
        with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="pt") as f:
            header = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                view = f.get_slice(key)
                header[key] = (tuple(view.get_shape()), view.get_dtype())
            placements = _check_layout(spec, base, header)
            if not load:
                return spec, None
            tensors: dict[Placement, torch.Tensor] = {}
            for key, where in placements.items():
                t = f.get_tensor(key).to(torch.float32)
                if check_values:
                    _check_values(key, t)
                tensors[where] = t
    except SafetensorError as e:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    weights = AdapterWeights(
        lora={
            (t.layer, t.module): (tensors["A", t.layer, t.module], tensors["B", t.layer, t.module])
            for t in spec.targets
        },
        saved={name: tensors["saved", name] for name in spec.saved_modules},
    )
    return spec, weights


def _check_values(key: str, t: torch.Tensor) -> None:
    # After the cast to float32, so a float64 1e300 counts as the inf it becomes.
    if not torch.isfinite(t).all():
        raise AdapterError(f"tensor {key} contains NaN or Inf values")
    if t.numel() and t.abs().max().item() > MAX_WEIGHT_ABS:
        raise AdapterError(
            f"tensor {key} holds values beyond +-{MAX_WEIGHT_ABS:g}, which overflow in float16"
        )


def _check_layout(
    spec: AdapterSpec, base: BaseModelInfo, header: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, Placement]:
    """Map every safetensors key to its place, checking names, shapes, and dtypes."""
    placements = _match_keys(spec, header)
    expected_shapes: dict[Placement, tuple[int, ...]] = {}
    for t in spec.targets:
        expected_shapes[("A", t.layer, t.module)] = (t.rank, t.in_features)
        expected_shapes[("B", t.layer, t.module)] = (t.out_features, t.rank)
    for name in spec.saved_modules:
        expected_shapes[("saved", name)] = base.saved_shape(name)

    found = {where: key for key, where in placements.items()}
    for where, shape in expected_shapes.items():
        key = found.get(where)
        if key is None:
            raise AdapterError(f"{WEIGHTS_FILE} is missing tensor {_describe(where)}")
        actual, dtype = header[key]
        if actual != shape:
            raise AdapterError(
                f"tensor {key} has shape {list(actual)}, expected {list(shape)} "
                f"({_expectation(where, spec)})"
            )
        if dtype not in _FLOAT_DTYPES:
            raise AdapterError(
                f"tensor {key} has dtype {dtype}; only F16, BF16 and F32 are supported"
            )
    return placements


def _match_keys(
    spec: AdapterSpec, header: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, Placement]:
    lora = {(t.layer, t.module) for t in spec.targets}
    saved = set(spec.saved_modules)
    placements: dict[str, Placement] = {}
    seen: dict[Placement, str] = {}
    adapter_names: set[str] = set()
    unexpected = []
    for key in sorted(header):
        where: Placement | None = None
        adapter_name: str | None = None
        match = _LORA_KEY.fullmatch(key)
        if match is not None:
            layer_module = parse_linear_name(match.group(1))
            if layer_module in lora:
                assert layer_module is not None
                where = (match.group(2), *layer_module)
                adapter_name = match.group(3)
        elif (match := _SAVED_KEY.fullmatch(key)) is not None and match.group(1) in saved:
            where = ("saved", match.group(1))
            adapter_name = match.group(2)
        if where is None:
            unexpected.append(key)
            continue
        if where in seen:
            raise AdapterError(f"tensors {seen[where]} and {key} both hold {_describe(where)}")
        if adapter_name is not None:
            adapter_names.add(adapter_name)
        seen[where] = key
        placements[key] = where
    if unexpected:
        named = ", ".join(unexpected[:_MAX_NAMED])
        more = f" and {len(unexpected) - _MAX_NAMED} more" if len(unexpected) > _MAX_NAMED else ""
        raise AdapterError(
            f"{WEIGHTS_FILE} has tensors that {CONFIG_FILE} does not account for: {named}{more}"
        )
    if len(adapter_names) > 1:
        raise AdapterError(
            f"{WEIGHTS_FILE} mixes adapter names {sorted(adapter_names)}; save one adapter per file"
        )
    return placements


def _describe(where: Placement) -> str:
    if where[0] == "saved":
        return f"{_PREFIX}{where[1]}.weight"
    return f"{_PREFIX}{linear_name(where[1], where[2])}.lora_{where[0]}.weight"


def _expectation(where: Placement, spec: AdapterSpec) -> str:
    if where[0] == "saved":
        return "the base model's shape for this module"
    target = spec.target(where[1], where[2])
    assert target is not None
    return (
        f"rank {target.rank} from {CONFIG_FILE}; {target.module} maps "
        f"{target.in_features} -> {target.out_features} features in the base model"
    )
