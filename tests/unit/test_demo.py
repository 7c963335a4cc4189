"""The demo model: built offline from CPython's documentation, a valid Hugging Face directory."""

from __future__ import annotations

import json
import math
import shutil
import string
from pathlib import Path

import pytest
import torch

from server.config import EngineConfig
from server.demo import DemoSize, build_demo_model, default_demo_dir, ensure_demo_model
from server.demo import build as demo_build
from server.demo.build import DEMO_VERSION, RECORD_FILE, is_complete
from server.demo.corpus import load_corpus, unwrap
from server.demo.tokenizer import chat_text
from server.demo.train import ThreadCalibration
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.config import ModelConfig
from server.model.loader import load_model
from server.model.tokenizer import Tokenizer, TokenizerError

TINY = DemoSize(
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    vocab_size=384,
    context_length=64,
    batch_size=4,
    learning_rate=3e-3,
)
PROMPTS = ["The for statement", "Exceptions are", "A function definition", "Dictionaries are"]
PUNCTUATION = string.punctuation + "“”‘’…"


def build_tiny(model_dir: Path) -> Path:
    return build_demo_model(model_dir, train_seconds=0.5, size=TINY, progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("demo") / "demo-model")


def engine(model_dir: Path, quantize: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), quantize=quantize, pool_mb=32))


def normalize(word: str) -> str:
    return word.strip(PUNCTUATION).lower()


def real_word_fraction(texts: list[str], vocabulary: set[str]) -> tuple[float, list[str]]:
    """Share of whitespace-separated words (punctuation stripped) found in the vocabulary."""
    words = [w for text in texts for w in map(normalize, text.split()) if w]
    return sum(w in vocabulary for w in words) / max(len(words), 1), words


def corpus_vocabulary() -> set[str]:
    return {w for text in load_corpus().texts() for w in map(normalize, text.split()) if w}


# ---- the tiny model: built in seconds ----------------------------------------------------------


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_tiny_demo_model_loads_in_the_engine_and_generates(tiny_dir: Path, quantize: str) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [out] = engine(tiny_dir, quantize).generate(["The for statement"], params)
    assert len(out.token_ids) == 8
    assert out.finish_reason == "length"


def test_config_is_a_llama_with_grouped_query_attention(tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.architecture, cfg.model_type) == ("LlamaForCausalLM", "llama")
    assert cfg.num_kv_heads < cfg.num_heads
    assert cfg.max_position_embeddings == TINY.context_length
    assert raw["torch_dtype"] == "float32"
    assert {"rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id"} <= raw.keys()


def test_special_token_ids_agree_across_files(tiny_dir: Path) -> None:
    tok = Tokenizer(tiny_dir)
    cfg = ModelConfig.from_dir(tiny_dir)
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert cfg.bos_token_id == tok.bos_token_id == tok.encode("x")[0]
    assert set(cfg.eos_token_ids) == {generation["eos_token_id"]} == set(tok.eos_token_ids)
    assert cfg.vocab_size == tok.vocab_size


def test_tokenizer_round_trips_text(tiny_dir: Path) -> None:
    tok = Tokenizer(tiny_dir)
    text = 'The "for" statement iterates — über alles\n    x = 1  # 日本'
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text


def test_chat_template_renders_roles_and_generation_prompt(tiny_dir: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
    ]
    rendered = Tokenizer(tiny_dir).apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "<s><|system|>\nBe brief.\n<|user|>\nWhat is a list?\n<|assistant|>\n"


def test_chat_template_ends_assistant_turns_with_eos(tiny_dir: Path) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rendered = Tokenizer(tiny_dir).apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == "<s><|user|>\nHi\n<|assistant|>\nHello.</s>\n"
    assert chat_text("Hi", "Hello.") == rendered.rstrip("\n")


def test_rendered_chat_encodes_with_a_single_bos(tiny_dir: Path) -> None:
    tok = Tokenizer(tiny_dir)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.special_token_ids >= {ids[1], ids[-2]}  # <|user|> and <|assistant|>


def test_chat_template_refuses_unknown_roles(tiny_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="unsupported chat role: tool"):
        Tokenizer(tiny_dir).apply_chat_template([{"role": "tool", "content": "42"}])


def test_checkpoint_loads_in_transformers_with_the_same_logits(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ours = load_model(tiny_dir, torch.float32)
    ids = torch.tensor([Tokenizer(tiny_dir).encode("Exceptions are raised")])
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.compute_logits(ours(ids, torch.arange(ids.shape[1])[None]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_record_says_how_the_model_was_made(tiny_dir: Path) -> None:
    record = json.loads((tiny_dir / RECORD_FILE).read_text())
    assert record["loraplex_demo_version"] == DEMO_VERSION
    assert record["size"]["hidden_size"] == TINY.hidden_size
    assert record["training"]["steps"] >= 1
    assert math.isfinite(record["training"]["validation_loss"])
    assert "pydoc_data.topics" in record["corpus"]["sources"]


# ---- building and caching ----------------------------------------------------------------------


def test_default_demo_dir_follows_the_cache_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    assert default_demo_dir() == tmp_path / "demo-model"
    monkeypatch.delenv("LORAPLEX_CACHE_DIR")
    assert default_demo_dir() == Path.home() / ".cache" / "loraplex" / "demo-model"


def test_failed_build_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(demo_build, "train_model", crash)
    with pytest.raises(RuntimeError, match="killed mid-training"):
        build_tiny(tmp_path / "demo-model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["missing weights", "older recipe", "unreadable record"])
def test_damaged_or_outdated_model_is_incomplete(
    tiny_dir: Path, tmp_path: Path, damage: str
) -> None:
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "demo-model"))
    assert is_complete(copy)
    if damage == "missing weights":
        (copy / "model.safetensors").unlink()
    elif damage == "older recipe":
        (copy / RECORD_FILE).write_text(json.dumps({"loraplex_demo_version": DEMO_VERSION - 1}))
    else:
        (copy / RECORD_FILE).write_text("{")
    assert not is_complete(copy)


def test_ensure_keeps_a_complete_model(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt a complete demo model")

    monkeypatch.setattr(demo_build, "build_demo_model", refuse)
    assert ensure_demo_model(tiny_dir, progress=False) == tiny_dir


def test_ensure_replaces_an_incomplete_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model_dir = tmp_path / "demo-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setattr(demo_build, "build_demo_model", lambda d, progress: build_tiny(d))
    assert ensure_demo_model(model_dir, progress=False) == model_dir
    assert is_complete(model_dir)
    assert ModelConfig.from_dir(model_dir).hidden_size == TINY.hidden_size
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model"]


def test_thread_calibration_keeps_the_faster_count_and_restores_the_default() -> None:
    default = torch.get_num_threads()
    if default < 2:
        pytest.skip("needs more than one torch thread")
    calibration = ThreadCalibration()
    for step in range(1, 2 * ThreadCalibration.STEPS_PER_CANDIDATE + 1):
        calibration.before_step(step)
        calibration.after_step(step, 1.0 if torch.get_num_threads() == default else 0.1)
    try:
        assert calibration.chosen == torch.get_num_threads() == 1
    finally:
        calibration.restore()
    assert torch.get_num_threads() == default


# ---- the corpus --------------------------------------------------------------------------------


def test_corpus_holds_out_validation_documents() -> None:
    corpus = load_corpus()
    assert corpus.validation
    assert not {d.text for d in corpus.train} & {d.text for d in corpus.validation}
    assert len(corpus.validation) * 10 < len(corpus.train)


def test_unwrap_joins_wrapped_prose_and_keeps_code() -> None:
    text = "A long sentence that was\nwrapped here.\n\n   for x in y:\n       pass\n\n* one\n* two"
    assert unwrap(text) == (
        "A long sentence that was wrapped here.\n\n   for x in y:\n       pass\n\n* one\n* two"
    )


# ---- the real demo model (slow: built once per cache, about 3 minutes) ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_demo_model_writes_real_words(demo_model_dir: Path, quantize: str) -> None:
    params = SamplingParams(max_tokens=48, temperature=0)
    texts = [o.text for o in engine(demo_model_dir, quantize).generate(PROMPTS, params)]
    fraction, words = real_word_fraction(texts, corpus_vocabulary())
    assert len(words) >= 40, texts
    assert len(set(words)) >= 10, texts
    assert fraction >= 0.8, texts


@pytest.mark.slow
def test_demo_model_learned_well_beyond_chance(demo_model_dir: Path) -> None:
    record = json.loads((demo_model_dir / RECORD_FILE).read_text())
    # Chance is ln(2048) = 7.6 nats; the unigram distribution alone gives about 6.
    assert record["training"]["validation_loss"] < 5.0
