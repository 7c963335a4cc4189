"""transformers as the oracle: greedy generations of the same checkpoint (test-only)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    """transformers' greedy generate of one prompt, never stopping early."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def next_token_logprobs(model, prompt: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[len(prompt), vocab] float32 log-probabilities of the token after each prompt position."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(dim=-1)


def prompt_token_logprobs(model, prompt: list[int]) -> list[float | None]:  # type: ignore[no-untyped-def]
    """Each prompt token's log-probability given the ones before it (None for the first)."""
    rows = next_token_logprobs(model, prompt)
    return [None] + [rows[j - 1, prompt[j]].item() for j in range(1, len(prompt))]
