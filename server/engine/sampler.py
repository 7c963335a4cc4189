"""Choose the next token for each sampling sequence from its logits.

Each non-greedy sequence draws its randomness from its own generator (seeded by the request's
`seed`), so a seeded request produces the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from server.engine.logits_processors import apply_logits_processors
from server.engine.sequence import Sequence, TokenLogprob

# Sampled in place of a token for a row whose logits are not all finite (the request failed).
NON_FINITE = -1


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. repetition_penalty over prompt and output (as transformers does);
    presence and frequency penalties over the output (as OpenAI does)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """In place: -inf outside each row's top_k (<= 0 keeps all) and top_p nucleus."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    ranks = torch.arange(vocab, device=logits.device)
    drop = ranks[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop |= before > top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    logits.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """logits: [S, vocab] float32, one row per sequence -> (token id, logprob info) per row;
    the token is NON_FINITE for a row whose logits hold an inf or a NaN."""
    # Checked before penalties and filters, which put -inf into healthy rows.
    finite = logits.isfinite().all(dim=-1)  # [S]
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
    apply_penalties(logits, seqs)
    apply_logits_processors(logits, seqs)

    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sub = (
            logits[idx]
            / torch.tensor([seqs[i].params.temperature for i in rows], device=logits.device)[
                :, None
            ]
        )
        top_k = torch.tensor([seqs[i].params.top_k for i in rows], device=logits.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=logits.device)
        _filter_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per row.
        noise = torch.stack(
            [
                torch.empty(logits.shape[1], device=logits.device).exponential_(
                    generator=seqs[i].generator
                )
                for i in rows
            ]
        )
        tokens[idx] = (probs / noise).argmax(dim=-1)

    # The verdict rides in the tokens' one device-to-host copy.
    token_list = torch.where(finite, tokens, NON_FINITE).tolist()
    results: list[tuple[int, TokenLogprob | None]] = []
    for row, (seq, token) in enumerate(zip(seqs, token_list, strict=True)):
        info = None
        if raw_logprobs is not None and seq.params.logprobs is not None and token != NON_FINITE:
            lp = raw_logprobs[row]
            top: list[tuple[int, float]] = []
            if seq.params.logprobs > 0:
                vals, ids = lp.topk(seq.params.logprobs)
                top = list(zip(ids.tolist(), vals.tolist(), strict=True))
            info = TokenLogprob(token, float(lp[token]), top)
        results.append((token, info))
    return results
