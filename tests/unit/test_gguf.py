"""GGUF checkpoints: tiny files written as llama.cpp lays them out, loaded here and by
transformers' own GGUF loader (the reference), and the errors for what is not supported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from server.config import ConfigError
from server.model.gguf import GgufCheckpoint, GgufError
from server.model.gguf_convert import RECORD_FILE
from server.model.gguf_tokenizer import GgufTokenizerError
from server.model.resolve import resolve_model
from tests.gguf_files import write_gguf
from tests.hf_reference import hf_greedy, load_hf

pytest.importorskip("gguf")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return a new list, 42 times!\n\n  x"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test converts into a cache of its own."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(cache))
    return cache


def _reference_state(gguf_path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.state_dict()


def test_a_float32_gguf_converts_back_to_exactly_the_original_checkpoint(
    tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model_dir("llama")
    path = write_gguf(original, tmp_path / "tiny.gguf")
    converted = resolve_model(str(path), torch.float32, progress=False)
    ours = load_file(str(converted / "model.safetensors"))
    want = load_file(str(original / "model.safetensors"))
    assert ours.keys() == want.keys()
    assert all(torch.equal(ours[k], want[k].float()) for k in want)
    config = json.loads((converted / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is False


def test_the_converted_tokenizer_encodes_and_decodes_like_the_original(
    tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model_dir("llama")
    converted = resolve_model(str(write_gguf(original, tmp_path / "t.gguf")), torch.float32)
    ours = HFTokenizer.from_file(str(converted / "tokenizer.json"))
    theirs = HFTokenizer.from_file(str(original / "tokenizer.json"))
    for text in [*TEXTS, "<s>hello</s>"]:
        assert ours.encode(text).ids == theirs.encode(text).ids
        assert ours.decode(ours.encode(text).ids) == theirs.decode(theirs.encode(text).ids)
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<s>", "</s>")
    assert (converted / "chat_template.jinja").read_text().startswith("{% for m in messages %}")


def test_greedy_tokens_of_the_converted_model_equal_transformers_on_the_original(
    tiny_model_dir, make_engine, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from server.engine.sampling_params import SamplingParams

    original = tiny_model_dir("llama")
    converted = resolve_model(str(write_gguf(original, tmp_path / "t.gguf")), torch.float32)
    engine = make_engine(converted)
    reference = load_hf(original)
    prompt = engine.tokenizer.encode(TEXTS[0])
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out[0].token_ids == hf_greedy(reference, prompt, 12)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_tensors_load_as_transformers_gguf_loader_loads_them(
    tiny_model_dir, tmp_path, qtype
) -> None:  # type: ignore[no-untyped-def]
    path = write_gguf(tiny_model_dir("llama"), tmp_path / f"tiny-{qtype}.gguf", qtype)
    ckpt = GgufCheckpoint(path)
    assert {t.type_name for t in ckpt.tensors} == {"F32", qtype}
    reference = _reference_state(path)
    for name, value in ckpt.iter_tensors():
        assert torch.equal(value, reference[name]), name


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K", "Q6_K"])
def test_k_quant_tensors_load_as_transformers_gguf_loader_loads_them(
    tiny_model_dir, tmp_path, qtype
) -> None:  # type: ignore[no-untyped-def]
    # K-quants come in blocks of 256 values: a model whose every row is a multiple of 256 wide.
    model = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, vocab_size=320)
    path = write_gguf(model, tmp_path / f"tiny-{qtype}.gguf", qtype)
    reference = _reference_state(path)
    for name, value in GgufCheckpoint(path).iter_tensors():
        assert torch.isfinite(value).all()
        assert torch.equal(value, reference[name]), name


def test_a_changed_file_is_converted_again_and_an_unchanged_one_is_not(
    tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "m.gguf")
    first = resolve_model(str(path), torch.float32)
    stamp = (first / RECORD_FILE).stat().st_mtime_ns
    assert resolve_model(str(tmp_path), torch.float32) == first  # a folder holding one file
    assert (first / RECORD_FILE).stat().st_mtime_ns == stamp
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    second = resolve_model(str(path), torch.float32)
    assert second != first and (second / RECORD_FILE).is_file()
    assert first.name == second.name == "m"  # the served model's name: the file's stem


def test_a_hugging_face_directory_is_served_as_it_is(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model_dir("llama")
    assert resolve_model(str(original), torch.float32) == original


def test_model_paths_that_name_no_single_gguf_file_are_refused(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    write_gguf(tiny_model_dir("llama"), tmp_path / "a.gguf")
    write_gguf(tiny_model_dir("llama"), tmp_path / "b.gguf")
    with pytest.raises(ConfigError, match=r"holds several GGUF files \(a.gguf, b.gguf\)"):
        resolve_model(str(tmp_path), torch.float32)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file but not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"), torch.float32)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"), torch.float32)


def test_an_unsupported_architecture_is_named(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(GgufError, match="GGUF architecture 'phi3' is not supported"):
        GgufCheckpoint(path)
    with pytest.raises(ConfigError, match="'phi3' is not supported"):
        resolve_model(str(path), torch.float32)


def test_an_unsupported_tensor_type_is_named(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gguf

    path = write_gguf(tiny_model_dir("llama"), tmp_path / "iq.gguf")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "iq4.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")):
            writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":  # [128, 64] in IQ4_NL: 18 bytes per 32 values
            raw = torch.randint(0, 255, (128, 2 * 18), dtype=torch.uint8).numpy()
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufError, match="'blk.0.ffn_up.weight' has GGUF type IQ4_NL"):
        GgufCheckpoint(tmp_path / "iq4.gguf")


def test_a_sentencepiece_vocabulary_is_refused_before_any_weight_is_written(
    tiny_model_dir, tmp_path, cache_dir
) -> None:  # type: ignore[no-untyped-def]
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "sp.gguf", tokenizer_model="llama")
    with pytest.raises(ConfigError, match="tokenizer.ggml.model 'llama' is not supported"):
        resolve_model(str(path), torch.float32)
    assert not list(cache_dir.rglob("*.safetensors"))  # nothing half-written is left behind
    with pytest.raises(GgufTokenizerError):
        from server.model.gguf_tokenizer import build_tokenizer

        build_tokenizer(GgufCheckpoint(path).vocabulary)
