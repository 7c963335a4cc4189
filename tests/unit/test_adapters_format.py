"""Reading and writing adapter files: layout checks, dtypes, and refusals naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import AdapterError, read_adapter, read_adapter_spec, write_adapter
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterWeights
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_config, tiny_weights

BASE = tiny_base()
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    write_adapter(tmp_path, tiny_config(rank=2), tiny_weights(rank=2))
    return tmp_path


def rewrite_tensors(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    weights = tiny_weights(rank=3, modules=("k_proj", "gate_proj"))
    weights.saved["model.norm"] = torch.randn(64)
    config = dict(tiny_config(3, ("k_proj", "gate_proj")), modules_to_save=["model.norm"])
    write_adapter(tmp_path, config, weights)
    spec, read = read_adapter(tmp_path, BASE, MAX_RANK)
    assert spec.saved_modules == ("model.norm",)
    assert read.lora.keys() == weights.lora.keys()
    for key, (a, b) in weights.lora.items():
        torch.testing.assert_close(read.lora[key][0], a)
        torch.testing.assert_close(read.lora[key][1], b)
    torch.testing.assert_close(read.saved["model.norm"], weights.saved["model.norm"])
    assert read.nbytes == weights.nbytes


def test_spec_read_takes_shapes_from_the_header_without_reading_data(adapter: Path) -> None:
    rewrite_tensors(adapter, lambda t: t[Q0_A].fill_(float("nan")))
    assert read_adapter_spec(adapter, BASE, MAX_RANK).max_rank == 2
    with pytest.raises(AdapterError, match=f"tensor {Q0_A} contains NaN or Inf"):
        read_adapter(adapter, BASE, MAX_RANK)


def test_inf_is_refused_naming_the_tensor(adapter: Path) -> None:
    rewrite_tensors(adapter, lambda t: t[Q0_A].fill_(float("inf")))
    with pytest.raises(AdapterError, match=f"tensor {Q0_A} contains NaN or Inf"):
        read_adapter(adapter, BASE, MAX_RANK)


def test_values_beyond_float16_range_are_refused_naming_the_tensor(adapter: Path) -> None:
    rewrite_tensors(adapter, lambda t: t[Q0_A].fill_(1e6))
    with pytest.raises(AdapterError, match=f"tensor {Q0_A} holds values beyond"):
        read_adapter(adapter, BASE, MAX_RANK)


@pytest.mark.parametrize(
    "data",
    [b"{" * 100_000 + b"}" * 100_000, b'{"r": ' + b"9" * 5000 + b"}", b"\xff\xfe"],
    ids=["deeply-nested", "huge-int", "bad-utf8"],
)
def test_unparseable_config_json_is_refused(adapter: Path, data: bytes) -> None:
    (adapter / CONFIG_FILE).write_bytes(data)
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE} is not valid JSON"):
        read_adapter(adapter, BASE, MAX_RANK)


def test_half_precision_tensors_are_read_as_float32(adapter: Path) -> None:
    def to_half(tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            tensors[key] = tensors[key].to(torch.bfloat16 if "lora_A" in key else torch.float16)

    rewrite_tensors(adapter, to_half)
    _, weights = read_adapter(adapter, BASE, MAX_RANK)
    assert {t.dtype for t in weights.tensors()} == {torch.float32}


def test_keys_with_an_adapter_name_infix_are_accepted(adapter: Path) -> None:
    def add_infix(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    rewrite_tensors(adapter, add_infix)
    _, weights = read_adapter(adapter, BASE, MAX_RANK)
    assert len(weights.lora) == 4


def test_two_adapter_names_in_one_file_are_refused(adapter: Path) -> None:
    def add_infixes(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            infix = ".other.weight" if key == Q0_A else ".default.weight"
            tensors[key.replace(".weight", infix)] = tensors.pop(key)

    rewrite_tensors(adapter, add_infixes)
    with pytest.raises(AdapterError, match=r"mixes adapter names \['default', 'other'\]"):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_pickled_bin_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps(tiny_config()))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 not opened")
    with pytest.raises(
        AdapterError, match=r"pickled \.bin adapters are refused; convert to safetensors"
    ):
        read_adapter_spec(tmp_path, BASE, MAX_RANK)


def test_missing_config_is_named(adapter: Path) -> None:
    (adapter / CONFIG_FILE).unlink()
    with pytest.raises(AdapterError, match=f"has no {CONFIG_FILE}"):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_config_that_is_not_json_is_refused(adapter: Path) -> None:
    (adapter / CONFIG_FILE).write_text("{r: 8")
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE} is not valid JSON"):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_corrupt_safetensors_is_refused(adapter: Path) -> None:
    (adapter / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE} is not a valid safetensors file"):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_adapter_for_another_base_is_refused_with_the_shapes(tmp_path: Path) -> None:
    other = tiny_base(hidden_size=32, intermediate_size=64)
    write_adapter(tmp_path, tiny_config(rank=2), tiny_weights(rank=2, base=other))
    with pytest.raises(
        AdapterError, match=rf"tensor {Q0_A} has shape \[2, 32\], expected \[2, 64\]"
    ):
        read_adapter_spec(tmp_path, BASE, MAX_RANK)


def test_rank_in_config_must_equal_the_tensor_rank(adapter: Path) -> None:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    config["rank_pattern"] = {"v_proj": 4}
    (adapter / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        AdapterError, match=r"v_proj.lora_A.weight has shape \[2, 64\], expected \[4, 64\]"
    ):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_missing_tensor_is_named(adapter: Path) -> None:
    rewrite_tensors(adapter, lambda t: t.pop(Q0_A.replace("lora_A", "lora_B")))
    with pytest.raises(
        AdapterError, match=r"missing tensor .*layers\.0\.self_attn\.q_proj\.lora_B"
    ):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_missing_saved_module_is_named(adapter: Path) -> None:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    config["modules_to_save"] = ["embed_tokens"]
    (adapter / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        AdapterError, match=r"missing tensor base_model\.model\.model\.embed_tokens"
    ):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_unexpected_tensors_are_named(adapter: Path) -> None:
    def add_extra(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = (
            torch.ones(64)
        )

    rewrite_tensors(adapter, add_extra)
    with pytest.raises(
        AdapterError, match=r"does not account for: base_model\.model\.lm_head\.lora_A"
    ):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_integer_dtype_is_refused_naming_tensor_and_dtype(adapter: Path) -> None:
    rewrite_tensors(adapter, lambda t: t.update({Q0_A: t[Q0_A].to(torch.int32)}))
    with pytest.raises(AdapterError, match=f"tensor {Q0_A} has dtype I32"):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_float64_is_refused(adapter: Path) -> None:
    rewrite_tensors(adapter, lambda t: t.update({Q0_A: t[Q0_A].to(torch.float64)}))
    with pytest.raises(AdapterError, match="has dtype F64; only F16, BF16 and F32"):
        read_adapter_spec(adapter, BASE, MAX_RANK)


def test_weights_convert_to_a_dtype_and_count_bytes() -> None:
    weights = tiny_weights(rank=2)
    half = weights.to(torch.bfloat16)
    assert half.nbytes * 2 == weights.nbytes
    assert weights.to(torch.float32) is weights


def test_empty_weights_have_no_bytes() -> None:
    assert AdapterWeights().nbytes == 0
