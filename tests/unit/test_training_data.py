"""Training data: JSONL validation by line number, masked prompts, EOS, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.model.tokenizer import Tokenizer
from server.training.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    batch_order,
    collate,
    load_jsonl,
    parse_jsonl,
    split_validation,
    tokenize_dataset,
    tokenize_example,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _lines(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def _problems(lines: list[str]) -> list[tuple[int | None, str]]:
    with pytest.raises(DataError) as info:
        parse_jsonl(lines, source="train.jsonl")
    return info.value.problems


@pytest.fixture(scope="module")
def tok(tiny_model_dir, tmp_path_factory) -> Tokenizer:  # type: ignore[no-untyped-def]
    # The tiny tokenizer plus a chat template, in a directory of its own.
    src = tiny_model_dir("llama")
    path = tmp_path_factory.mktemp("tok")
    (path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(path)


def test_valid_lines_of_each_format_parse():
    for obj in (
        {"prompt": "a", "completion": "b"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"text": "hello"},
    ):
        (ex,) = parse_jsonl(_lines(obj))
        assert ex.line == 1 and ex.fields == obj


def test_blank_lines_are_skipped_and_line_numbers_count_them():
    examples = parse_jsonl(_lines({"text": "a"}, "", "   ", {"text": "b"}))
    assert [e.line for e in examples] == [1, 4]


def test_bad_json_is_reported_with_its_line_number():
    problems = _problems(_lines({"text": "a"}, '{"text": "b"', {"text": "c"}))
    assert problems[0][0] == 2 and "invalid JSON" in problems[0][1]
    assert "train.jsonl line 2: invalid JSON" in str(DataError("train.jsonl", problems))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"prompt": "a"}, "missing key 'completion'"),
        ({"completion": "a"}, "missing key 'prompt'"),
        ({"prompt": 1, "completion": "b"}, "'prompt' must be a string"),
        ({"prompt": "a", "completion": ""}, "'completion' is empty"),
        ({"text": "a", "label": 1}, "unexpected key 'label'"),
        ({"input": "a"}, "expected keys"),
        ([1, 2], "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ],
)
def test_wrong_keys_and_types_are_reported_by_line(obj, message):
    problems = _problems(_lines({"text": "fine"}, obj))
    assert problems == [(2, problems[0][1])]
    assert message in problems[0][1]


def test_every_bad_line_is_reported():
    problems = _problems(_lines("{", {"text": 1}, {"text": "ok"}, "nope"))
    assert [n for n, _ in problems] == [1, 2, 4]


def test_mixed_formats_are_refused():
    problems = _problems(_lines({"text": "a"}, {"prompt": "p", "completion": "c"}))
    assert problems[0][0] == 2 and "line 1 is text" in problems[0][1]


def test_empty_file_is_refused(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: has no examples"):
        load_jsonl(path)


def test_invalid_utf8_is_reported_by_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        load_jsonl(path)


def test_prompt_tokens_are_masked_and_eos_closes_the_completion(tok: Tokenizer):
    ex = Example(1, "prompt_completion", {"prompt": "The quick", "completion": " brown fox"})
    out = tokenize_example(ex, tok, max_len=64)
    prompt = tok.encode("The quick")
    completion = tok.encode(" brown fox", add_special_tokens=False)
    eos = tok.encode("</s>", add_special_tokens=False)
    assert out.input_ids == prompt + completion + eos
    assert out.labels == [IGNORE_INDEX] * len(prompt) + completion + eos


def test_train_on_prompt_keeps_prompt_labels(tok: Tokenizer):
    ex = Example(1, "prompt_completion", {"prompt": "The quick", "completion": " fox"})
    out = tokenize_example(ex, tok, max_len=64, train_on_prompt=True)
    assert out.labels == out.input_ids


def test_text_examples_train_on_every_token(tok: Tokenizer):
    out = tokenize_example(Example(1, "text", {"text": "The lazy dog."}), tok, max_len=64)
    assert out.labels == out.input_ids and out.input_ids[-1] in tok.eos_token_ids


def test_only_assistant_turns_are_trained_in_chat_examples(tok: Tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The quick"},
        {"role": "assistant", "content": "brown fox"},
        {"role": "user", "content": "jumps"},
        {"role": "assistant", "content": "over"},
    ]
    out = tokenize_example(Example(1, "messages", {"messages": messages}), tok, max_len=256)
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(out.input_ids, skip_special_tokens=False) == full
    trained = [t for t, label in zip(out.input_ids, out.labels, strict=True) if label != -100]
    # Each reply with its EOS, nothing of the prompts and not the newline after each EOS.
    assert tok.decode(trained, skip_special_tokens=False) == "brown fox</s>over</s>"


def test_truncation_keeps_the_first_max_len_tokens(tok: Tokenizer):
    ex = Example(1, "text", {"text": "The quick brown fox jumps over the lazy dog. " * 4})
    out = tokenize_example(ex, tok, max_len=10)
    assert len(out.input_ids) == len(out.labels) == 10


def test_examples_with_nothing_trained_after_truncation_are_dropped(tok: Tokenizer):
    long_prompt = Example(1, "prompt_completion", {"prompt": "fox " * 40, "completion": "dog"})
    short = Example(2, "prompt_completion", {"prompt": "fox", "completion": " dog"})
    assert len(tokenize_dataset([long_prompt, short], tok, max_len=8)) == 1
    with pytest.raises(DataError, match="no example has a trained token"):
        tokenize_dataset([long_prompt], tok, max_len=8)


def test_collate_right_pads_with_ignored_labels_to_a_multiple():
    from server.training.data import TokenizedExample

    batch = collate(
        [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])],
        pad_id=0,
        pad_multiple=8,
    )
    assert batch.input_ids.shape == (2, 8)
    assert batch.labels[1].tolist() == [8] + [-100] * 7
    assert batch.positions[1].tolist() == list(range(8))
    assert (batch.num_tokens, batch.num_trainable) == (4, 2)


def test_group_by_length_batches_cover_everything_once_and_are_seeded():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    batches = batch_order(lengths, 4, seed=1, epoch=0, group_by_length=True)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(300))
    assert batches == batch_order(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert batches != batch_order(lengths, 4, seed=1, epoch=1, group_by_length=True)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    plain = batch_order(lengths, 4, seed=1, epoch=0, group_by_length=False)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread < plain_spread / 4  # grouped batches pad far less


def test_validation_split_is_seeded_and_disjoint():
    examples = [Example(i, "text", {"text": str(i)}) for i in range(1, 21)]
    train, valid = split_validation(examples, 0.1, 1000, seed=3)
    assert len(valid) == 2 and len(train) == 18
    assert {e.line for e in train}.isdisjoint(e.line for e in valid)
    assert split_validation(examples, 0.1, 1000, seed=3) == (train, valid)
    assert split_validation(examples[:1], 0.1, 1000, seed=3) == (examples[:1], [])


def test_chat_examples_without_a_chat_template_are_refused_once(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir("llama"))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    examples = [Example(n, "messages", {"messages": messages}) for n in (1, 2)]
    with pytest.raises(DataError, match="train.jsonl: 'messages' examples need a chat template"):
        tokenize_dataset(examples, tok, max_len=32, source="train.jsonl")
