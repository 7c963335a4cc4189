"""Choose the next token for each sampling sequence from its logits, vectorized over the batch.

One pass over [S, vocab] for every row at once: penalties, per-row logits processors, temperature,
top-k, top-p, the random draw, logprobs; no per-row loop over the batch and exactly one
device-to-host copy (the tokens, with their logprobs when asked).

Randomness is counter-based: the noise for (request seed, position, token) is a hash of the
three, so a seeded request draws the same tokens whatever else shares its batch (and again
after a preemption), and all rows draw in one vectorized op.
"""

from __future__ import annotations

import torch

from server.engine.logits_processors import apply_logits_processors
from server.engine.prompt_logprobs import PromptScores, to_host_with
from server.engine.sequence import Sequence, TokenLogprob

# Sampled in place of a token for a row whose logits are not all finite (the request failed).
NON_FINITE = -1


def non_finite_message(seq: Sequence) -> str:
    """Why a request whose row was NON_FINITE failed, naming its adapter."""
    source = "the base model" if seq.adapter_name is None else f"adapter {seq.adapter_name!r}"
    return f"{source} produced non-finite values (inf or NaN) for this request"


# A per-row logits processor (structured output, logit bias): called with the sequence and its
# row of logits ([vocab] float32, a view), which it may change in place (set -inf to forbid).

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer: a bijective avalanche of 32-bit values (held in int64)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds: [S] int64 (63-bit), positions: [S] int64 -> [S, vocab] float32 draws of Exp(1),
    a pure function of (seed, position, token id)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    row = _fmix32(lo ^ _fmix32(hi ^ _fmix32(positions & _M32)))  # [S]
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _fmix32(row[:, None] ^ _mul32(tokens, 0x9E3779B1)[None, :])
    h = _fmix32(h ^ 0x5BD1E995)
    uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # (0, 1)
    return -uniform.log()


class PenaltyCounts:
    """Per-sequence token counts on the device for the penalties, kept incrementally.

    A sequence with penalties gets a row when first sampled (prompt presence and output counts
    written once from its tokens); each step then adds the sampled tokens on the device, so
    the cost per step does not grow with the sequence's length.
    """

    def __init__(self, max_rows: int, vocab: int, device: torch.device) -> None:
        self.output_counts = torch.zeros(max_rows, vocab, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(max_rows, vocab, dtype=torch.bool, device=device)
        self._rows: dict[str, int] = {}
        self._free = list(range(max_rows - 1, -1, -1))

    def rows_for(self, seqs: list[Sequence]) -> list[int]:
        rows = []
        for seq in seqs:
            row = self._rows.get(seq.request_id)
            if row is None:
                assert self._free, "more sequences with penalties than rows"
                row = self._free.pop()
                self._rows[seq.request_id] = row
                dev = self.output_counts.device
                prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.int64, device=dev)
                self.in_prompt[row].zero_()
                self.in_prompt[row, prompt] = True
                out = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=dev)
                self.output_counts[row] = torch.bincount(out, minlength=self.in_prompt.shape[1])
            rows.append(row)
        return rows

    def release(self, seq: Sequence) -> None:
        row = self._rows.pop(seq.request_id, None)
        if row is not None:
            self._free.append(row)


class Sampler:
    """Samples one token per row; holds the penalty counts of running sequences."""

    def __init__(self, max_num_seqs: int, device: torch.device) -> None:
        self.max_num_seqs = max_num_seqs
        self.device = device
        self._penalties: PenaltyCounts | None = None  # allocated on the first penalty

    def release(self, seq: Sequence) -> None:
        """The sequence finished: forget its penalty counts."""
        if self._penalties is not None:
            self._penalties.release(seq)

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], prompt: PromptScores | None = None
    ) -> list[tuple[int, TokenLogprob | None]]:
        """logits: [S, vocab] float32, one row per sequence (changed in place) -> (token id,
        logprob info) per row; the token is NON_FINITE for a row holding an inf or a NaN.
        The step's prompt scores, if any, ride in the same device-to-host copy."""
        params = [s.params for s in seqs]
        # Checked before penalties and filters, which put -inf into healthy rows.
        # A row's float64 sum is finite iff every logit is (float32's largest times any vocab
        # stays far below float64's): one read of the logits, 4x cheaper than isfinite().all().
        finite = logits.sum(dim=-1, dtype=torch.float64).isfinite()  # [S]
        max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=-1)
        raw_logprobs = logits.log_softmax(dim=-1) if max_logprobs >= 0 else None

        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        penalty_idx = None
        if pen_rows:
            penalty_idx = self._apply_penalties(logits, [seqs[i] for i in pen_rows], pen_rows)
        # Structured output, logit_bias, min_tokens: after the penalties, before temperature
        # and filtering, so a forbidden token (-inf) is never drawn.
        apply_logits_processors(logits, seqs)

        tokens = logits.argmax(dim=-1)  # [S] greedy choice
        if not all(p.greedy for p in params):
            tokens = self._draw(logits, seqs, tokens)
        tokens = torch.where(finite, tokens, NON_FINITE)
        if penalty_idx is not None:
            self._count(tokens, penalty_idx)

        if raw_logprobs is None:
            # The verdict rides in the tokens' one device-to-host copy.
            return [(int(t), None) for t in to_host_with(tokens, prompt)]
        return self._with_logprobs(tokens, raw_logprobs, max_logprobs, seqs, prompt)

    # ---- the steps of a draw ----------------------------------------------------------------

    def _apply_penalties(
        self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place on `rows`: repetition penalty over prompt and output (as transformers),
        presence and frequency penalties over the output (as OpenAI). Returns (logit rows,
        count rows) for counting the sampled tokens afterwards."""
        dev = logits.device
        if self._penalties is None:
            self._penalties = PenaltyCounts(self.max_num_seqs, logits.shape[1], dev)
        table = self._penalties
        count_rows = torch.tensor(table.rows_for(seqs), device=dev)
        logit_rows = torch.tensor(rows, device=dev)
        host = torch.tensor(
            [
                [s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
                for s in seqs
            ],
            dtype=torch.float32,
        )
        rep, presence, frequency = host.to(dev).unbind(1)  # [P] each
        counts = table.output_counts[count_rows].to(torch.float32)  # [P, vocab]
        seen = table.in_prompt[count_rows] | (counts > 0)
        sub = logits[logit_rows]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep[:, None], sub * rep[:, None]), sub)
        sub -= frequency[:, None] * counts + presence[:, None] * (counts > 0)
        logits[logit_rows] = sub
        return logit_rows, count_rows

    def _draw(
        self, logits: torch.Tensor, seqs: list[Sequence], greedy_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Temperature, top-k, top-p and an exponential race, for every row at once; greedy
        rows keep their argmax."""
        dev = logits.device
        params = [s.params for s in seqs]
        floats = torch.tensor(
            [[p.temperature if not p.greedy else 1.0, p.top_p] for p in params],
            dtype=torch.float32,
        ).to(dev)
        ints = torch.tensor(
            [[p.top_k, s.seed, s.num_tokens, p.greedy] for p, s in zip(params, seqs, strict=True)],
            dtype=torch.int64,
        ).to(dev)
        temperature, top_p = floats.unbind(1)
        top_k, seeds, positions, greedy = ints.unbind(1)
        # Shifted by each row's max first, in float32: (logit - max) / T is <= 0, so no
        # temperature > 0 overflows to inf (whose softmax is NaN), whatever the logits' dtype.
        logits32 = logits.float()
        scaled = (logits32 - logits32.amax(dim=-1, keepdim=True)) / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            _filter_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = exponential_noise(seeds, positions, logits.shape[1])
        drawn = (probs / noise).argmax(dim=-1)
        return torch.where(greedy.bool(), greedy_tokens, drawn)

    def _count(self, tokens: torch.Tensor, penalty_idx: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add the sampled tokens to their sequences' output counts (on the device)."""
        assert self._penalties is not None
        logit_rows, count_rows = penalty_idx
        sampled = tokens[logit_rows]
        ok = sampled >= 0
        self._penalties.output_counts.index_put_(
            (count_rows, sampled.clamp(min=0)), ok.to(torch.int32), accumulate=True
        )

    @staticmethod
    def _with_logprobs(
        tokens: torch.Tensor,
        raw: torch.Tensor,
        max_logprobs: int,
        seqs: list[Sequence],
        prompt: PromptScores | None,
    ) -> list[tuple[int, TokenLogprob | None]]:
        """Tokens plus logprob info, packed in one float64 tensor for one copy to the host."""
        chosen = raw.gather(1, tokens.clamp(min=0)[:, None])  # [S, 1]
        parts = [tokens[:, None].double(), chosen.double()]
        if max_logprobs > 0:
            vals, ids = raw.topk(max_logprobs, dim=-1)  # [S, k]
            parts += [ids.double(), vals.double()]
        host = to_host_with(torch.cat(parts, dim=1), prompt)
        results: list[tuple[int, TokenLogprob | None]] = []
        for seq, row in zip(seqs, host, strict=True):
            token = int(row[0])
            n = seq.params.logprobs
            info = None
            if n is not None and token != NON_FINITE:
                k = max_logprobs
                ids_row, vals_row = row[2 : 2 + k], row[2 + k : 2 + 2 * k]
                top = [(int(i), v) for i, v in zip(ids_row[:n], vals_row[:n], strict=True)]
                info = TokenLogprob(token, row[1], top)
            results.append((token, info))
        return results


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


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """One-off sampling with a fresh Sampler (penalty counts rebuilt from the sequences)."""
    return Sampler(len(seqs), logits.device)(logits, seqs)
