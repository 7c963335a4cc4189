"""Convert a GGUF file once into a Hugging Face directory in the cache, then serve that.

Every consumer of a base model (the engine, fine-tuning jobs, merges, the benchmarks) reads a
Hugging Face directory, so a GGUF file is converted into one: config.json, the dequantized
weights as safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja and
generation_config.json. The directory is keyed by the file's path, size and modification
time, the weight dtype and this converter's version, so a changed file is converted again;
it is assembled under a temporary name and renamed into place, so an interrupted conversion
never leaves a half-written model where the server would load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from server.model.gguf import GgufCheckpoint
from server.model.gguf_tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the output changes, so older conversions are redone
RECORD_FILE = "loraplex_gguf.json"
SHARD_BYTES = 2 << 30  # weights per safetensors file


def cache_root() -> Path:
    """$LORAPLEX_CACHE_DIR if set, else ~/.cache/loraplex."""
    cache = os.environ.get("LORAPLEX_CACHE_DIR")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "loraplex"


def conversion_dir(gguf_path: Path, dtype: torch.dtype, name: str) -> Path:
    """Where the conversion of this file (as it is now) to `dtype` lives in the cache."""
    stat = gguf_path.stat()
    key = json.dumps(
        [str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns, str(dtype), CONVERTER_VERSION]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / digest / name


def ensure_converted(
    gguf_path: Path, dtype: torch.dtype, name: str | None = None, progress: bool = False
) -> Path:
    """The cached Hugging Face directory of `gguf_path`, converting it first if needed."""
    out = conversion_dir(gguf_path, dtype, name or gguf_path.stem)
    if (out / RECORD_FILE).is_file():
        return out
    logger.info("converting %s to a %s checkpoint in %s", gguf_path.name, dtype, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        convert_gguf(gguf_path, staging, dtype, progress)
        try:
            staging.rename(out)
        except OSError:
            if not (out / RECORD_FILE).is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def convert_gguf(gguf_path: Path, out: Path, dtype: torch.dtype, progress: bool = False) -> None:
    """Write the Hugging Face files of `gguf_path` into the existing directory `out`."""
    ckpt = GgufCheckpoint(gguf_path)
    config = {**ckpt.config, "torch_dtype": str(dtype).removeprefix("torch.")}
    tokenizer = build_tokenizer(ckpt.vocabulary)  # before the weights: fails fast
    _write_weights(ckpt, out, dtype, progress)
    tokenizer.save(str(out / "tokenizer.json"))
    bos = ckpt.token_text("tokenizer.ggml.bos_token_id")
    eos = ckpt.token_text("tokenizer.ggml.eos_token_id")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": ckpt.token_text("tokenizer.ggml.unknown_token_id"),
        "pad_token": ckpt.token_text("tokenizer.ggml.padding_token_id"),
        "add_bos_token": ckpt.vocabulary.add_bos_token,
        "model_max_length": config["max_position_embeddings"],
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    if ckpt.chat_template is not None:
        (out / "chat_template.jinja").write_text(ckpt.chat_template, encoding="utf-8")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None}
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "config.json", config)
    stat = gguf_path.stat()
    record = {
        "source": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }
    _write_json(out / RECORD_FILE, record)  # last: its presence marks a whole conversion


def _write_weights(ckpt: GgufCheckpoint, out: Path, dtype: torch.dtype, progress: bool) -> None:
    """Safetensors shards of at most SHARD_BYTES, each written as soon as it is full."""
    files: list[tuple[str, list[str]]] = []  # (temporary file name, its tensors)
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        file = f"shard-{len(files)}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        files.append((file, list(shard)))

    bar = tqdm(
        ckpt.tensors, desc=f"converting {ckpt.path.name}", unit="tensor", disable=not progress
    )
    for tensor in bar:
        value = ckpt.load(tensor).to(dtype).contiguous()
        if shard and size + value.nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[tensor.name] = value
        size += value.nbytes
    flush()
    if len(files) == 1:
        (out / files[0][0]).rename(out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (file, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (out / file).rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    _write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
