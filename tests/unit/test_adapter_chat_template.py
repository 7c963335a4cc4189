"""An adapter's own chat template: read from its tokenizer files, checked against the base's
vocabulary, stored with its spec, and rendered in the base's sandbox."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jinja2
import pytest

from adapters import AdapterError, AdapterRegistry, AdapterSpec, AdapterStore
from adapters.chat_template import (
    MAX_CHAT_TEMPLATE_CHARS,
    BaseVocabulary,
    ChatTemplate,
    read_chat_template,
)
from server.api.serving_chat import stop_at_template_eos
from server.engine.sampling_params import SamplingParams
from server.model.tokenizer import Tokenizer, TokenizerError
from tests.tiny_models import make_tokenizer
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
BASE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(320).save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": BASE_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def vocabulary(tok: Tokenizer) -> BaseVocabulary:
    return tok.vocabulary()


def write(path: Path, files: dict[str, object]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, str) else json.dumps(content)
        (path / name).write_text(data)
    return path


def tokenizer_config(**fields: object) -> dict[str, object]:
    return {"tokenizer_config.json": {"bos_token": "<s>", "eos_token": "</s>", **fields}}


def test_template_only_config_is_read(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    d = write(tmp_path, tokenizer_config(chat_template=CHATML))
    assert read_chat_template(d, vocabulary) == ChatTemplate(CHATML, "<s>", "</s>")


def test_adapter_without_tokenizer_files_has_no_template(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    assert read_chat_template(tmp_path, vocabulary) is None


def test_chat_template_jinja_file_wins_over_the_config(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    d = write(tmp_path, {**tokenizer_config(chat_template="old"), "chat_template.jinja": CHATML})
    template = read_chat_template(d, vocabulary)
    assert template is not None and template.source == CHATML


def test_named_templates_use_the_default_one(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    template = read_chat_template(
        write(tmp_path, tokenizer_config(chat_template=named)), vocabulary
    )
    assert template is not None and template.source == CHATML


def test_tokenizer_json_equal_to_the_base_is_accepted(
    tmp_path: Path, model_dir: Path, vocabulary: BaseVocabulary
) -> None:
    d = write(tmp_path, tokenizer_config(chat_template=CHATML))
    (d / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    assert read_chat_template(d, vocabulary) is not None


def test_tokenizer_json_adding_tokens_is_refused(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    extended = make_tokenizer(320)
    extended.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    d = write(tmp_path, tokenizer_config(chat_template=CHATML))
    extended.save(str(d / "tokenizer.json"))
    with pytest.raises(AdapterError, match="adds 2 tokens the base model lacks .*'<|im_end|>'"):
        read_chat_template(d, vocabulary)


def test_tokenizer_json_with_a_smaller_vocabulary_is_refused(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    d = write(tmp_path, {})
    make_tokenizer(300).save(str(d / "tokenizer.json"))
    with pytest.raises(AdapterError, match="lacks 20 of the base model's 320 tokens"):
        read_chat_template(d, vocabulary)


def test_special_token_the_base_lacks_is_refused(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    d = write(tmp_path, tokenizer_config(chat_template=CHATML, eos_token="<|im_end|>"))
    with pytest.raises(AdapterError, match="adds 1 token the base model lacks .*im_end"):
        read_chat_template(d, vocabulary)


def test_added_token_with_another_id_is_refused(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    d = write(tmp_path, {"added_tokens.json": {"</s>": 7}})
    with pytest.raises(AdapterError, match="gives 1 token other ids than the base model"):
        read_chat_template(d, vocabulary)


def test_template_that_does_not_compile_is_refused(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    d = write(tmp_path, tokenizer_config(chat_template="{% for m in messages %}{{ m }"))
    with pytest.raises(AdapterError, match="chat_template does not compile: line 1"):
        read_chat_template(d, vocabulary)


def test_oversized_template_is_refused(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    huge = "x" * (MAX_CHAT_TEMPLATE_CHARS + 1)
    d = write(tmp_path, tokenizer_config(chat_template=huge))
    with pytest.raises(AdapterError, match=f"at most {MAX_CHAT_TEMPLATE_CHARS} are allowed"):
        read_chat_template(d, vocabulary)


def test_non_string_template_is_refused(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    d = write(tmp_path, tokenizer_config(chat_template=42))
    with pytest.raises(AdapterError, match="chat_template must be a string"):
        read_chat_template(d, vocabulary)


def test_tokenizer_files_are_refused_when_the_base_vocabulary_is_unknown(tmp_path: Path) -> None:
    d = write(tmp_path, tokenizer_config(chat_template=CHATML))
    with pytest.raises(AdapterError, match="vocabulary is unknown"):
        read_chat_template(d, None)


def test_spec_keeps_its_template_through_json() -> None:
    spec = AdapterSpec(1, 2.0, False, (), (), (), chat_template=ChatTemplate(CHATML, None, "</s>"))
    assert AdapterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def registry(tmp_path: Path, vocabulary: BaseVocabulary) -> AdapterRegistry:
    base = dataclasses.replace(tiny_base(), vocabulary=vocabulary)
    return AdapterRegistry(AdapterStore(tmp_path, durable=False), base, MAX_RANK, 1 << 20)


def test_registered_upload_carries_its_template(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    config = json.dumps({"chat_template": CHATML}).encode()
    files = {**tiny_files(rank=2), "tokenizer_config.json": config}
    reg = registry(tmp_path, vocabulary).register_files("a", files)
    assert reg.spec.chat_template == ChatTemplate(CHATML)
    reopened = registry(tmp_path, vocabulary)
    reopened.load_index()
    assert reopened.get("a").spec.chat_template == ChatTemplate(CHATML)  # type: ignore[union-attr]


def test_upload_with_a_bad_template_registers_nothing(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    bad = json.dumps({"chat_template": "{% if %}"}).encode()
    reg = registry(tmp_path, vocabulary)
    with pytest.raises(AdapterError, match="does not compile"):
        reg.register_files("a", {**tiny_files(rank=2), "tokenizer_config.json": bad})
    assert reg.get("a") is None and reg.store.list() == []


def test_in_place_reload_swaps_the_template(tmp_path: Path, vocabulary: BaseVocabulary) -> None:
    reg = registry(tmp_path, vocabulary)
    reg.register_files("a", {**tiny_files(rank=2), "chat_template.jinja": CHATML.encode()})
    new, old = reg.reload_files("a", tiny_files(rank=2))
    assert old.spec.chat_template is not None and new.spec.chat_template is None


def test_tokenizer_view_renders_with_the_adapter_template(tok: Tokenizer) -> None:
    view = tok.with_chat_template(CHATML, None, None)
    assert view.apply_chat_template(HI) == "<s>user\nHi</s>\n<s>assistant\n"
    assert tok.apply_chat_template(HI, False) == "<s>[user] Hi"
    assert view.encode_chat(HI) == tok.encode("<s>user\nHi</s>\n<s>assistant\n", False)


def test_template_that_raises_while_rendering_is_a_tokenizer_error(tok: Tokenizer) -> None:
    view = tok.with_chat_template("{{ raise_exception('no system role') }}", None, None)
    with pytest.raises(TokenizerError, match="no system role"):
        view.encode_chat(HI)
    broken = tok.with_chat_template("{{ messages[5]['content'] + 1 }}", None, None)
    with pytest.raises(TokenizerError, match="chat template failed"):
        broken.encode_chat(HI)


def test_adapter_template_runs_in_the_sandbox(tok: Tokenizer) -> None:
    view = tok.with_chat_template("{{ messages.__class__.__mro__ }}", None, None)
    with pytest.raises(TokenizerError):
        view.apply_chat_template(HI)


def test_chats_stop_at_the_adapter_template_eos_when_the_base_does_not(tok: Tokenizer) -> None:
    own_eos = tok.with_chat_template(CHATML, None, "<unk>")
    params = [SamplingParams(max_tokens=4, stop_token_ids=[5]), SamplingParams(ignore_eos=True)]
    stop_at_template_eos(own_eos, params)
    assert params[0].stop_token_ids == [5, tok.encode("<unk>", False)[0]]
    assert params[1].stop_token_ids == []
    same_eos = [SamplingParams()]
    stop_at_template_eos(tok.with_chat_template(CHATML, None, "</s>"), same_eos)
    assert same_eos[0].stop_token_ids == []


def test_a_registered_folder_brings_its_template_and_the_store_keeps_the_file(
    tmp_path: Path, vocabulary: BaseVocabulary
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in {**tiny_files(rank=2), "chat_template.jinja": CHATML.encode()}.items():
        (folder / name).write_bytes(data)
    reg = registry(tmp_path / "data", vocabulary)
    added = reg.register_dir("a", folder)
    assert added.spec.chat_template == ChatTemplate(CHATML)
    assert (reg.store.path("a") / "chat_template.jinja").read_text() == CHATML


def test_a_runaway_template_is_stopped_after_its_time_bound() -> None:
    import time

    from adapters.chat_template import TemplateTimeout, compile_chat_template, render_bounded

    looping = compile_chat_template(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"
    )
    start = time.monotonic()
    with pytest.raises(TemplateTimeout, match="ran for more than 0.2 s"):
        render_bounded(looping, seconds=0.2)
    assert time.monotonic() - start < 1.0
    # Loops over strings are template code too.
    nested = compile_chat_template("{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}")
    with pytest.raises(TemplateTimeout):
        render_bounded(nested, seconds=0.2, s="x" * 100_000)
    # Nothing is left traced afterwards, and a normal template renders the same as before.
    assert sys.gettrace() is None
    chat = compile_chat_template("{% for m in messages %}{{ m['content'] }};{% endfor %}")
    assert render_bounded(chat, messages=[{"content": "a"}, {"content": "b"}]) == "a;b;"


def test_a_template_cannot_build_huge_strings_with_repetition() -> None:
    from adapters.chat_template import compile_chat_template, render_bounded

    with pytest.raises(jinja2.TemplateError, match="more than 1048576 items"):
        render_bounded(compile_chat_template("{{ 'ab' * 100000000 }}"))
    with pytest.raises(jinja2.TemplateError, match="exponent"):
        render_bounded(compile_chat_template("{{ 10 ** 100000 }}"))
    assert render_bounded(compile_chat_template("{{ '-' * 3 }}{{ 2 ** 3 }}")) == "---8"
