"""Which adapter a request is for, read from its body the way the routes read it."""

from __future__ import annotations

import json

# Training files and jobs live on the replica that took them: these routes all go to the
# replica holding this routing key (Ray multiplexing, like an adapter's requests).
TRAINING_KEY = "loraplex:training"
_TRAINING = ("/v1/files", "/v1/fine_tuning")
# Routes whose JSON body names the model (OpenAI) or adapter (LoRAX) a request runs on.
_OPENAI = ("/v1/completions", "/v1/chat/completions")
_LORAX = ("/", "/generate", "/generate_stream")


def routing_key(path: str, body: bytes, base_model: str) -> str | None:
    """What Ray routes a request by: its adapter, TRAINING_KEY, or None (any replica)."""
    if path.startswith(_TRAINING):
        return TRAINING_KEY
    return adapter_of(path, body, base_model)


def adapter_of(path: str, body: bytes, base_model: str) -> str | None:
    """The adapter name of an inference request, or None (base model, or not inference).

    A body that does not parse routes like a base request; the replica then answers with
    the API's own error.
    """
    if path not in _OPENAI and path not in _LORAX:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if path in _OPENAI:
        model = data.get("model")
    else:
        params = data.get("parameters")
        model = params.get("adapter_id") if isinstance(params, dict) else None
    if not isinstance(model, str) or not model or model == base_model:
        return None
    return model
