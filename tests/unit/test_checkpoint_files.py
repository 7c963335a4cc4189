"""The base checkpoint's chat template and generation_config.json, as transformers saves them."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from server.api.clients import ServedModel
from server.api.schemas.openai import CompletionRequest
from server.api.serving_openai import CompletionService
from server.engine.grammar import GrammarCompiler
from server.model.generation_config import (
    GenerationConfig,
    GenerationConfigError,
    GenerationDefaults,
    generation_defaults,
)
from server.model.tokenizer import Tokenizer, TokenizerError
from tests.unit.test_api_services import Engine, Models

JINJA = "{% for m in messages %}[jinja]{{ m['content'] }}{% endfor %}"
CONFIG = "{% for m in messages %}[config]{{ m['content'] }}{% endfor %}"
NAMED = [
    {"name": "tool_use", "template": "[tools]"},
    {"name": "default", "template": "{% for m in messages %}[named]{{ m['content'] }}{% endfor %}"},
]
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A private copy of the tiny checkpoint, free to edit."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model"))


def _tokenizer_config(model_dir: Path, **fields: object) -> None:
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_chat_template_jinja_is_read_before_the_tokenizer_configs(model_dir: Path) -> None:
    _tokenizer_config(model_dir, chat_template=CONFIG)
    (model_dir / "chat_template.jinja").write_text(JINJA)
    tok = Tokenizer(model_dir)
    assert tok.apply_chat_template(CHAT) == "[jinja]hi"
    assert tok.chat_template_origin == "chat_template.jinja"


def test_the_tokenizer_configs_string_template_is_used_without_a_jinja_file(model_dir) -> None:  # type: ignore[no-untyped-def]
    _tokenizer_config(model_dir, chat_template=CONFIG)
    assert Tokenizer(model_dir).apply_chat_template(CHAT) == "[config]hi"


def test_a_list_of_named_templates_uses_the_default_one(model_dir: Path) -> None:
    _tokenizer_config(model_dir, chat_template=NAMED)
    assert Tokenizer(model_dir).apply_chat_template(CHAT) == "[named]hi"


def test_an_explicit_template_file_wins_over_the_checkpoints(model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (model_dir / "chat_template.jinja").write_text(JINJA)
    override = tmp_path / "mine.jinja"
    override.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    tok = Tokenizer(model_dir, chat_template=override)
    assert tok.apply_chat_template(CHAT) == "<hi>"
    assert tok.chat_template_origin == str(override)


def test_a_checkpoint_without_any_template_has_none(model_dir: Path) -> None:
    tok = Tokenizer(model_dir)
    assert tok.chat_template is None and tok.chat_template_origin is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CHAT)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: _tokenizer_config(d, chat_template=NAMED[:1]),
            "tokenizer_config.json field 'chat_template' is a list of named templates without "
            "'default'",
        ),
        (
            lambda d: _tokenizer_config(d, chat_template=7),
            "tokenizer_config.json field 'chat_template' must be a string, got int",
        ),
        (
            lambda d: (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"),
            "chat_template.jinja is not UTF-8 text",
        ),
        (
            lambda d: (d / "chat_template.jinja").write_text("{% for m in messages %}"),
            "chat_template.jinja: chat template line 1",
        ),
        (
            lambda d: (d / "tokenizer_config.json").write_text("{not json"),
            "tokenizer_config.json is not valid JSON",
        ),
        (
            lambda d: _tokenizer_config(d, eos_token=5),
            "tokenizer_config.json field 'eos_token' must be a token's text",
        ),
    ],
    ids=["list-without-default", "not-a-string", "not-utf8", "syntax", "bad-json", "bad-eos"],
)
def test_unusable_template_files_are_a_start_up_error_naming_file_and_field(
    model_dir, edit, message
) -> None:  # type: ignore[no-untyped-def]
    edit(model_dir)
    with pytest.raises(TokenizerError) as info:
        Tokenizer(model_dir)
    assert message in str(info.value)


def test_a_missing_override_file_is_named(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="--chat-template '.*nope.jinja' is not a file"):
        Tokenizer(model_dir, chat_template=tmp_path / "nope.jinja")


def _generation_config(model_dir: Path, **fields: object) -> None:
    (model_dir / "generation_config.json").write_text(json.dumps(fields))


def test_end_tokens_come_from_generation_config_as_an_int_or_a_list(model_dir: Path) -> None:
    _generation_config(model_dir, eos_token_id=[2, 7, 9])
    assert GenerationConfig.from_dir(model_dir).eos_token_ids == (2, 7, 9)
    _generation_config(model_dir, eos_token_id=4)
    assert GenerationConfig.from_dir(model_dir).eos_token_ids == (4,)
    assert GenerationConfig.from_dir(model_dir / "missing") == GenerationConfig()


def test_sampling_defaults_are_the_fields_that_differ_from_transformers_defaults(
    model_dir: Path,
) -> None:
    _generation_config(
        model_dir, temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.0, do_sample=True
    )
    defaults = GenerationConfig.from_dir(model_dir).defaults
    assert defaults == GenerationDefaults(temperature=0.6, top_p=0.9)  # top_k 50 is the default
    assert generation_defaults("auto", model_dir) == defaults
    assert generation_defaults("vllm", model_dir) == GenerationDefaults()


def test_another_folder_can_supply_the_generation_config(model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "gen"
    other.mkdir()
    _generation_config(other, max_new_tokens=7)
    assert generation_defaults(str(other), model_dir) == GenerationDefaults(max_tokens=7)
    with pytest.raises(GenerationConfigError, match="is not a folder holding"):
        generation_defaults(str(tmp_path / "none"), model_dir)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"eos_token_id": "2"}, "field 'eos_token_id' must be a token id or a list of them"),
        ({"eos_token_id": [2, -1]}, "field 'eos_token_id' must be a token id or a list of them"),
        ({"temperature": "hot"}, "field 'temperature' must be a number"),
        ({"temperature": 9}, "field 'temperature' must be in [0, 2]"),
        ({"top_p": 0}, "field 'top_p' must be in (0, 1]"),
        ({"top_k": 2.5}, "field 'top_k' must be an integer >= 0"),
        ({"max_new_tokens": 0}, "field 'max_new_tokens' must be an integer >= 1"),
    ],
)
def test_unusable_generation_config_fields_are_named(model_dir, fields, message) -> None:  # type: ignore[no-untyped-def]
    _generation_config(model_dir, **fields)
    with pytest.raises(GenerationConfigError) as info:
        GenerationConfig.from_dir(model_dir)
    assert f"generation_config.json {message}" in str(info.value)


def _service(model_dir: Path, defaults: GenerationDefaults) -> tuple[CompletionService, Engine]:
    tok = Tokenizer(model_dir)
    model = ServedModel(tok, GrammarCompiler(tok, 320), 64, 320, defaults)
    engine = Engine()
    return CompletionService(engine, Models(), model), engine


def test_the_models_defaults_fill_only_the_fields_a_request_leaves_out(model_dir: Path) -> None:
    defaults = GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20, max_tokens=5)
    svc, engine = _service(model_dir, defaults)
    asyncio.run(svc.completions(None, CompletionRequest(model="base", prompt=[1, 5])))  # type: ignore[arg-type]
    asyncio.run(
        svc.completions(
            None,  # type: ignore[arg-type]
            CompletionRequest(model="base", prompt=[1, 5], temperature=0, max_tokens=3, top_k=0),
        )
    )
    left_out, sent = engine.calls[0][1][0], engine.calls[1][1][0]
    assert (left_out.temperature, left_out.top_p, left_out.top_k) == (0.6, 0.9, 20)
    assert left_out.max_tokens == 5
    assert (sent.temperature, sent.top_p, sent.top_k, sent.max_tokens) == (0, 0.9, 0, 3)
