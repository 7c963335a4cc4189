"""Fine-tuning data: JSONL parsing and validation, tokenization with masked prompts, batching.

One example per line, all lines in one format: {"prompt", "completion"}, {"messages": [...]}
(rendered with the model's chat template; only assistant turns are trained) or {"text"}.
Blank lines are skipped; everything else that is wrong is reported by its line number.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.model.tokenizer import Tokenizer, TokenizerError
from server.training.hparams import HParams

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens left out of the loss (prompt, padding)
MAX_REPORTED = 5  # problems quoted in one DataError
FORMATS: dict[str, frozenset[str]] = {
    "prompt_completion": frozenset({"prompt", "completion"}),
    "messages": frozenset({"messages"}),
    "text": frozenset({"text"}),
}
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name"})


class DataError(ValueError):
    """A training file that cannot be used; `problems` holds (line number or None, message)."""

    def __init__(
        self, source: str, problems: list[tuple[int | None, str]], total: int | None = None
    ) -> None:
        # total: how many problems there were, when `problems` holds only the first ones.
        self.problems = problems
        shown = [f"{source} line {n}: {p}" if n else f"{source}: {p}" for n, p in problems]
        more = (total or len(problems)) - MAX_REPORTED
        text = "; ".join(shown[:MAX_REPORTED]) + (f" (and {more} more)" if more > 0 else "")
        super().__init__(text)


@dataclass(frozen=True)
class Example:
    """One validated line: `fields` holds its format's keys (prompt/completion, messages, text)."""

    line: int
    format: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class TokenizedExample:
    """input_ids and labels of equal length; labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trainable(self) -> int:
        # Position 0 is never predicted (the loss is on next tokens).
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def _example_format(obj: Any) -> tuple[str | None, str | None]:
    """(format, None) or (None, what is wrong) for one parsed line."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    keys = set(obj)
    for name, required in FORMATS.items():
        if keys & required:
            missing, extra = required - keys, keys - required
            if missing:
                return None, f"missing key {sorted(missing)[0]!r}"
            if extra:
                return None, f"unexpected key {sorted(extra)[0]!r} in a {name} example"
            return name, _check_fields(name, obj)
    return None, "expected keys 'prompt' and 'completion', 'messages', or 'text'"


def _check_fields(fmt: str, obj: dict[str, Any]) -> str | None:
    if fmt != "messages":
        for key in FORMATS[fmt]:
            if not isinstance(obj[key], str):
                return f"{key!r} must be a string, got {type(obj[key]).__name__}"
        if fmt == "text" and not obj["text"]:
            return "'text' is empty"
        if fmt == "prompt_completion" and not obj["completion"]:
            return "'completion' is empty"
        return None
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object"
        if set(m) - MESSAGE_KEYS:
            return f"messages[{i}] has unexpected key {sorted(set(m) - MESSAGE_KEYS)[0]!r}"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "'messages' has no assistant message to train on"
    return None


class JsonlValidator:
    """Checks a training file line by line as it arrives, keeping no examples in memory.

    feed() each line (bytes, without or with its newline); finish() raises DataError naming
    the bad lines, else returns the number of examples.
    """

    def __init__(self, source: str = "data") -> None:
        self.source = source
        self.num_lines = 0
        self.num_examples = 0
        self.problems: list[tuple[int | None, str]] = []  # the first MAX_REPORTED
        self.num_problems = 0
        self._first: tuple[int, str] | None = None

    def feed(self, raw: bytes | str) -> Example | None:
        """Check the next line; its Example, or None for a blank or bad line."""
        self.num_lines += 1
        number = self.num_lines
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return self._problem(number, "not valid UTF-8")
        if not text.strip():
            return None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._problem(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
        fmt, problem = _example_format(obj)
        if fmt is None or problem is not None:
            return self._problem(number, problem or "invalid example")
        if self._first is None:
            self._first = (number, fmt)
        elif fmt != self._first[1]:
            first_line, first_fmt = self._first
            problem = f"a {fmt} example, but line {first_line} is {first_fmt}; use one format"
            return self._problem(number, problem)
        self.num_examples += 1
        return Example(number, fmt, obj)

    def skip(self, problem: str) -> None:
        """Count the next line as bad without reading it (a line too long to hold)."""
        self.num_lines += 1
        self._problem(self.num_lines, problem)

    def finish(self) -> int:
        """The number of examples; DataError if any line was bad or none was an example."""
        if self.problems:
            raise DataError(self.source, self.problems, self.num_problems)
        if not self.num_examples:
            raise DataError(self.source, [(None, "has no examples")])
        return self.num_examples

    def _problem(self, number: int, problem: str) -> None:
        self.num_problems += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append((number, problem))


def parse_jsonl(lines: Iterable[bytes | str], source: str = "data") -> list[Example]:
    """Validate every line; raise DataError listing the bad lines by number."""
    validator = JsonlValidator(source)
    examples = [ex for raw in lines if (ex := validator.feed(raw)) is not None]
    validator.finish()
    return examples


def count_examples(path: str | Path) -> int:
    """Validate a JSONL training file as a stream; its number of examples."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), [(None, "file does not exist")])
    validator = JsonlValidator(path.name)
    with path.open("rb") as f:
        for raw in f:
            validator.feed(raw)
    return validator.finish()


def load_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL training file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), [(None, "file does not exist")])
    with path.open("rb") as f:
        return parse_jsonl(f, source=path.name)


def _segments(ex: Example, tok: Tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, trained) pieces, in order."""
    if ex.format == "text":
        return [(ex.fields["text"], True)]
    if ex.format == "prompt_completion":
        return [(ex.fields["prompt"], False), (ex.fields["completion"], True)]
    messages = ex.fields["messages"]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            # The template does not render turn by turn; train on the last reply only.
            prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
            full = tok.apply_chat_template(messages, add_generation_prompt=False)
            return [
                (prompt, False),
                (full.removeprefix(prompt), messages[-1]["role"] == "assistant"),
            ]
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = tok.apply_chat_template(messages, add_generation_prompt=False)[len(done) :]
    return [*pieces, (rest, False)] if rest else pieces


def tokenize_example(
    ex: Example, tok: Tokenizer, max_len: int, train_on_prompt: bool = False
) -> TokenizedExample:
    """Token ids and labels: prompts masked, EOS closing each trained piece, cut to max_len."""
    eos_id = _eos_id(tok)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(ex, tok):
        # The first piece is encoded like a served prompt (BOS added when the tokenizer adds it).
        special = not ids and not (tok.bos_token and text.startswith(tok.bos_token))
        piece = tok.encode(text, add_special_tokens=special)
        if trained:
            ends = [i for i, t in enumerate(piece) if t in tok.eos_token_ids]
            if ends:
                # Text a template adds after the turn's EOS (a newline) is not the model's to say.
                cut = ends[-1] + 1
                ids += piece
                labels += piece[:cut] + [IGNORE_INDEX] * (len(piece) - cut)
                continue
            piece = [*piece, eos_id]
        ids += piece
        labels += piece if trained or train_on_prompt else [IGNORE_INDEX] * len(piece)
    return TokenizedExample(ids[:max_len], labels[:max_len])


def _eos_id(tok: Tokenizer) -> int:
    """The id appended to trained text: the tokenizer's eos_token, else the lowest stop id."""
    if tok.eos_token:
        ids = tok.encode(tok.eos_token, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
    if tok.eos_token_ids:
        return min(tok.eos_token_ids)
    raise TokenizerError("the tokenizer has no eos token to end completions with")


def tokenize_dataset(
    examples: Sequence[Example],
    tok: Tokenizer,
    max_len: int,
    train_on_prompt: bool = False,
    source: str = "data",
) -> list[TokenizedExample]:
    """Tokenize all examples; drop (and count) those left with no trained token."""
    if tok.chat_template is None and any(e.format == "messages" for e in examples):
        problem = "'messages' examples need a chat template and this model has none"
        raise DataError(source, [(None, problem + "; use prompt/completion or text examples")])
    out: list[TokenizedExample] = []
    problems: list[tuple[int | None, str]] = []
    for ex in examples:
        try:
            tokenized = tokenize_example(ex, tok, max_len, train_on_prompt)
        except TokenizerError as exc:
            problems.append((ex.line, str(exc)))
            continue
        if tokenized.num_trainable > 0:
            out.append(tokenized)
    if problems:
        raise DataError(source, problems)
    if len(out) < len(examples):
        logger.warning(
            "%d of %d examples have no trained token within %d tokens and are skipped",
            len(examples) - len(out),
            len(examples),
            max_len,
        )
    if not out:
        raise DataError(source, [(None, f"no example has a trained token within {max_len} tokens")])
    return out


DataSource = str | Path | Sequence[Example]


def prepare_datasets(
    train: DataSource,
    validation: DataSource | None,
    tok: Tokenizer,
    max_len: int,
    hp: HParams,
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Tokenized (train, validation); without a validation source a part of train is held out."""
    train_examples = _examples(train)
    if validation is not None:
        valid_examples = _examples(validation)
    else:
        train_examples, valid_examples = split_validation(
            train_examples, hp.validation_fraction, hp.max_validation_examples, hp.seed
        )
    train_set = tokenize_dataset(
        train_examples, tok, max_len, hp.train_on_prompt, _source_name(train)
    )
    if not valid_examples:
        return train_set, []
    valid_source = _source_name(validation) if validation is not None else _source_name(train)
    valid_set = tokenize_dataset(valid_examples, tok, max_len, hp.train_on_prompt, valid_source)
    return train_set, valid_set[: hp.max_validation_examples]


def _source_name(source: DataSource) -> str:
    return Path(source).name if isinstance(source, str | Path) else "data"


def _examples(source: DataSource) -> list[Example]:
    return load_jsonl(source) if isinstance(source, str | Path) else list(source)


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A short hash of tokenized examples (a checkpoint is only resumed on the same data)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(array("q", e.input_ids).tobytes())
        digest.update(array("q", e.labels).tobytes())
    return digest.hexdigest()[:16]


def split_validation(
    examples: list[Example], fraction: float, max_examples: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` held out, at least 1 when there are 2+."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    count = min(max_examples, len(examples) - 1, max(1, round(fraction * len(examples))))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """One epoch's batches of example indices; a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    indices = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    # Hugging Face's LengthGroupedSampler: random megabatches of 50 batches, each sorted by
    # length, so a batch pads little; the longest batch goes first to fail fast on memory.
    mega = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(indices), mega):
        chunk = sorted(indices[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


@dataclass
class Batch:
    """Right-padded tensors: input_ids, labels, positions [B, S]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    num_tokens: int  # real (unpadded) tokens
    num_trainable: int  # tokens whose next token is in the loss

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.positions.to(device),
            self.num_tokens,
            self.num_trainable,
        )


def collate(examples: Sequence[TokenizedExample], pad_id: int, pad_multiple: int = 1) -> Batch:
    """Pad to the batch's longest example, rounded up to a multiple of pad_multiple."""
    longest = max(len(e.input_ids) for e in examples)
    seq_len = -(-longest // pad_multiple) * pad_multiple
    ids = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    positions = torch.arange(seq_len).expand(len(examples), seq_len).contiguous()
    return Batch(
        ids,
        labels,
        positions,
        sum(len(e.input_ids) for e in examples),
        sum(e.num_trainable for e in examples),
    )
