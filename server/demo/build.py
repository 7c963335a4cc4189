"""Build the demo model once and cache it: corpus -> tokenizer -> training -> an HF directory.

The directory is assembled under a temporary name beside the target and renamed into place,
so an interrupted build never leaves a half-written model where the server would load it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from server.demo.corpus import Corpus, load_corpus
from server.demo.tokenizer import BOS, EOS, PAD, chat_text, save_tokenizer, train_tokenizer
from server.demo.train import DemoSize, train_model
from server.model.config import ModelConfig
from server.model.loader import save_checkpoint

logger = logging.getLogger(__name__)

# Bump when the recipe changes, so cached demo models built by older code are rebuilt.
DEMO_VERSION = 1
RECORD_FILE = "loraplex_demo.json"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    RECORD_FILE,
)
SOURCE_NAMES = {"topics": "pydoc_data.topics", "module": "standard library module docstrings"}


def default_demo_dir() -> Path:
    """$LORAPLEX_CACHE_DIR/demo-model if set, else ~/.cache/loraplex/demo-model."""
    cache = os.environ.get("LORAPLEX_CACHE_DIR")
    root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "loraplex"
    return root / "demo-model"


def is_complete(model_dir: Path) -> bool:
    """Whether model_dir holds every file of a demo model built by this recipe version."""
    if not all((model_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        record = json.loads((model_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("loraplex_demo_version") == DEMO_VERSION


def ensure_demo_model(model_dir: Path | None = None, progress: bool = True) -> Path:
    """The demo model's directory, built first if it is absent, incomplete or outdated."""
    model_dir = Path(model_dir) if model_dir is not None else default_demo_dir()
    if is_complete(model_dir):
        return model_dir
    logger.info("no demo model in %s; training one (about 3 minutes, once)", model_dir)
    return build_demo_model(model_dir, progress=progress)


def build_demo_model(
    model_dir: Path,
    *,
    train_seconds: float = 150.0,
    seed: int = 0,
    progress: bool = True,
    size: DemoSize | None = None,
) -> Path:
    """Train a demo model from scratch and write it to model_dir, replacing what is there."""
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{model_dir.name}-", dir=model_dir.parent) as tmp:
        staging = Path(tmp) / model_dir.name
        staging.mkdir()
        record = _write_model(staging, size or DemoSize(), train_seconds, seed, progress)
        record["build_seconds"] = round(time.perf_counter() - start, 1)
        _write_json(staging / RECORD_FILE, record)
        _fsync_files(staging)
        if model_dir.exists():
            model_dir.rename(Path(tmp) / "replaced")  # removed with the temporary directory
        try:
            staging.rename(model_dir)
        except OSError:
            if not is_complete(model_dir):
                raise
            logger.info("another process finished a demo model in %s first", model_dir)
    logger.info("demo model written to %s in %.0fs", model_dir, time.perf_counter() - start)
    return model_dir


def _encode(tok: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[int]:
    encodings = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
    return [i for enc in encodings for i in enc.ids]


def _encode_corpus(tok: Tokenizer, corpus: Corpus) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation token streams; each document is <s> text </s>."""
    docs = _encode(tok, [d.text + EOS for d in corpus.train], add_special_tokens=True)
    # Rendered chats carry their own <s>, as served chat prompts do.
    chats = _encode(tok, [chat_text(q, a) for q, a in corpus.chats], add_special_tokens=False)
    validation = _encode(tok, [d.text + EOS for d in corpus.validation], add_special_tokens=True)
    return torch.tensor(docs + chats), torch.tensor(validation)


def _write_model(
    staging: Path, size: DemoSize, train_seconds: float, seed: int, progress: bool
) -> dict[str, Any]:
    corpus = load_corpus()
    tok_start = time.perf_counter()
    tokenizer_texts = [d.text for d in corpus.train] + [a for _, a in corpus.chats]
    tok = train_tokenizer(tokenizer_texts, size.vocab_size)
    size = dataclasses.replace(size, vocab_size=tok.get_vocab_size(with_added_tokens=True))
    train_stream, validation_stream = _encode_corpus(tok, corpus)
    logger.info(
        "demo tokenizer: %d tokens of vocabulary, trained in %.1fs; %d training and %d "
        "validation tokens",
        size.vocab_size,
        time.perf_counter() - tok_start,
        train_stream.numel(),
        validation_stream.numel(),
    )
    ids = {name: tok.token_to_id(t) for name, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = size.hf_config(ids["bos"], ids["eos"], ids["pad"])
    model, result = train_model(
        ModelConfig.from_dict(config),
        size,
        train_stream,
        validation_stream,
        train_seconds=train_seconds,
        seed=seed,
        progress=progress,
    )
    save_checkpoint(model, staging, config)
    save_tokenizer(tok, staging, size.context_length)
    generation = {
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    _write_json(staging / "generation_config.json", generation)
    return {
        "loraplex_demo_version": DEMO_VERSION,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "corpus": {
            "sources": sorted({SOURCE_NAMES[d.source.split(":")[0]] for d in corpus.train}),
            "train_documents": len(corpus.train),
            "validation_documents": len(corpus.validation),
            "chat_turns": len(corpus.chats),
            "chars": corpus.num_chars,
            "train_tokens": train_stream.numel(),
            "validation_tokens": validation_stream.numel(),
        },
        "size": dataclasses.asdict(size),
        "seed": seed,
        "train_seconds_budget": train_seconds,
        "training": dataclasses.asdict(result),
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _fsync_files(directory: Path) -> None:
    # The rename is atomic, but only durable if the data it points at reached the disk first.
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
