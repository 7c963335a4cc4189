"""Prompt logprobs: how likely each prompt token was given the tokens before it, scored in the
same step that computes the prompt's K/V, for the sequences that ask and no others.

A step computes positions [start, start + n) of a sequence; the hidden state at position p
predicts token p + 1. So a chunk scores prompt tokens start + 1 .. start + n, up to the prompt's
last token (the last prompt position predicts the first output token, which the sampler draws).
Scoring takes the full-vocabulary log-softmax of those rows only, `chunk_rows` rows at a time, so
a long prompt never holds a [prompt, vocab] tensor, and a step without such rows pays nothing.

The scores ride in the step's one device-to-host copy (the sampler's, or their own in a step
where no sequence samples) and are appended to each sequence's `prompt_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.errors import InvalidRequestError
from server.engine.sampling_params import MAX_PROMPT_LOGPROB_ENTRIES
from server.engine.sequence import Sequence, TokenLogprob

if TYPE_CHECKING:
    from server.engine.scheduler import ScheduledSeq
    from server.model.llama import LlamaForCausalLM


def check_prompt_logprobs(seq: Sequence) -> None:
    """Refuse a request whose prompt scores would exceed what one request may ask."""
    k = seq.params.prompt_logprobs
    if k is None:
        return
    entries = (seq.num_prompt_tokens - 1) * (1 + k)
    if entries > MAX_PROMPT_LOGPROB_ENTRIES:
        raise InvalidRequestError(
            f"prompt logprobs for {seq.num_prompt_tokens} prompt tokens with {k} alternatives "
            f"each make {entries} entries; at most {MAX_PROMPT_LOGPROB_ENTRIES} are allowed "
            "(fewer alternatives, or a shorter prompt)",
            "prompt_logprobs",
        )


@dataclass
class PromptRows:
    """The device side of a step's prompt scoring: views of the step buffers."""

    idx: torch.Tensor  # [P] int64 flat token rows whose hidden states score a prompt token
    targets: torch.Tensor  # [P] int64 the prompt token each row scores
    k: int  # alternatives per row: the most any sequence in the step asks


@dataclass
class PromptPlan:
    """The host side: which sequences score how many prompt tokens this step, in row order."""

    seqs: list[tuple[Sequence, int]]
    flat_idx: list[int]
    targets: list[int]
    k: int


def plan_prompt_rows(batch: list[ScheduledSeq]) -> PromptPlan | None:
    """The rows of this step that score prompt tokens; None when no sequence asks."""
    if not any(s.seq.needs_prompt_logprobs for s in batch):
        return None
    plan = PromptPlan([], [], [], 0)
    flat_start = 0  # the chunk's first row in the step's flat tokens
    for s in batch:
        seq = s.seq
        # Positions scored before (a preempted sequence recomputes them) are not scored again.
        first = max(s.start, len(seq.prompt_logprobs or ()) - 1)
        end = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
        if seq.needs_prompt_logprobs and end > first:
            assert seq.params.prompt_logprobs is not None
            plan.seqs.append((seq, end - first))
            plan.flat_idx.extend(range(flat_start + first - s.start, flat_start + end - s.start))
            plan.targets.extend(seq.token_ids[first + 1 : end + 1])
            plan.k = max(plan.k, seq.params.prompt_logprobs)
        flat_start += s.num_new_tokens
    return plan if plan.seqs else None


@torch.inference_mode()
def score_prompt_rows(
    model: LlamaForCausalLM, hidden: torch.Tensor, rows: PromptRows, chunk_rows: int
) -> torch.Tensor:
    """hidden: [T, hidden] -> [P, 2 + 2k] float32: per row the target token's logprob, its rank
    (1 = likeliest), then the k likeliest token ids and their logprobs. No host sync."""
    num_rows, k = rows.idx.shape[0], rows.k
    out = torch.empty(num_rows, 2 + 2 * k, dtype=torch.float32, device=hidden.device)
    for a in range(0, num_rows, chunk_rows):
        b = min(a + chunk_rows, num_rows)
        logprobs = model.compute_logits(hidden[rows.idx[a:b]]).log_softmax(dim=-1)  # [c, V]
        chosen = logprobs.gather(1, rows.targets[a:b, None])  # [c, 1]
        out[a:b, 0:1] = chosen
        out[a:b, 1] = (logprobs > chosen).sum(dim=-1) + 1
        if k:
            values, ids = logprobs.topk(k, dim=-1)  # [c, k]
            out[a:b, 2 : 2 + k] = ids
            out[a:b, 2 + k :] = values
    return out


@dataclass
class PromptScores:
    """A step's prompt scores on the device, and the plan saying whose they are."""

    plan: PromptPlan
    values: torch.Tensor  # [P, 2 + 2k] float32, from score_prompt_rows

    def deliver(self, host: list[list[float]]) -> None:
        """Append each scored token to its sequence (host: the values' rows, copied)."""
        k = self.plan.k
        row = 0
        for seq, count in self.plan.seqs:
            assert seq.prompt_logprobs is not None and seq.params.prompt_logprobs is not None
            n = seq.params.prompt_logprobs
            for values, target in zip(
                host[row : row + count], self.plan.targets[row : row + count], strict=True
            ):
                ids, vals = values[2 : 2 + n], values[2 + k : 2 + k + n]
                top = [(int(i), v) for i, v in zip(ids, vals, strict=True)]
                seq.prompt_logprobs.append(TokenLogprob(target, values[0], top, int(values[1])))
            row += count

    def deliver_alone(self) -> None:
        """In a step where nothing samples, the scores are the step's one copy to the host."""
        self.deliver(self.values.cpu().tolist())


def to_host_with(packed: torch.Tensor, scores: PromptScores | None) -> list:
    """packed.tolist() on the host; the step's prompt scores, if any, come in the same
    device-to-host copy and are delivered to their sequences."""
    if scores is None:
        return packed.cpu().tolist()
    n = packed.numel()
    flat = torch.cat([packed.double().flatten(), scores.values.double().flatten()]).cpu()
    scores.deliver(flat[n:].view(scores.values.shape).tolist())
    return flat[:n].view(packed.shape).tolist()
