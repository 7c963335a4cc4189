"""The demo tokenizer: byte-level BPE trained on the corpus, plus a small chat template."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLES = ("system", "user", "assistant")
# Ids 0..5 in this order: pad, bos, eos, then one marker per chat role.
SPECIAL_TOKENS = (PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES))

# Starts with bos_token: servers (ours, vLLM, transformers) encode a rendered chat prompt
# with add_special_tokens=False. Only assistant turns end with eos, so the model never
# learns to stop after a question.
CHAT_TEMPLATE = """\
{{ bos_token }}{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('unsupported chat role: ' + message['role']) }}
{% endif %}
<|{{ message['role'] }}|>
{{ message['content'] }}{{ eos_token if message['role'] == 'assistant' else '' }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer whose encodings start with <s> (add_special_tokens=True)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """CHAT_TEMPLATE rendered the way the server renders it (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=BOS,
        eos_token=EOS,
    )


def chat_text(question: str, answer: str) -> str:
    """One user question and its answer in the chat format, <s> included: a training document."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return render_chat(messages, add_generation_prompt=False).rstrip("\n")


def save_tokenizer(tok: Tokenizer, model_dir: Path, max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json in the Hugging Face layout."""
    tok.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
