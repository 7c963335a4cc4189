"""Per-request changes to the logits before sampling: logit_bias, min_tokens and grammars.

Each sequence that needs any carries a `LogitsState` (built once when the request is
validated). `apply_logits_processors` edits a whole batch's logits in place, before
temperature, top-k and top-p: the grammar masks of every constrained row are filled into one
bitmask (narrowed to the tokens that keep the output valid UTF-8) and applied in one call, so
constrained and unconstrained requests share a step.
`accept_token` advances a sequence's grammar after its token is chosen.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import xgrammar as xgr

from server.engine.errors import InvalidRequestError
from server.engine.grammar import GrammarCompiler, Utf8Guard

if TYPE_CHECKING:
    from server.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class LogitsState:
    """One sequence's logits processors: bias, tokens held back until min_tokens, grammar."""

    bias_ids: torch.Tensor | None = None  # [B] token ids
    bias_values: torch.Tensor | None = None  # [B] added to those tokens' logits
    min_tokens: int = 0
    stop_ids: torch.Tensor | None = None  # [E] banned while fewer than min_tokens were made
    matcher: xgr.GrammarMatcher | None = None
    utf8: Utf8Guard | None = None  # with a matcher: keeps its output valid UTF-8
    utf8_state: int = 0  # where the output stands in a UTF-8 character (0: between two)
    eos_ids: tuple[int, ...] = ()  # allowed when the grammar allows nothing (a dead end)
    banned_ids: torch.Tensor | None = None  # [N] never allowed (control characters in JSON)

    @staticmethod
    def build(
        params: SamplingParams,
        grammars: GrammarCompiler,
        eos_token_ids: Iterable[int],
        device: torch.device,
    ) -> LogitsState | None:
        """The state a request needs, or None when its logits are used as they are."""
        if not params.logit_bias and not params.min_tokens and params.grammar is None:
            return None
        state = LogitsState(min_tokens=params.min_tokens)
        if params.logit_bias:
            bad = [i for i in params.logit_bias if not 0 <= i < grammars.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids in [0, {grammars.vocab_size}); got "
                    f"{bad[0]}",
                    "logit_bias",
                )
            ids, values = zip(*sorted(params.logit_bias.items()), strict=True)
            state.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            state.bias_values = torch.tensor(values, dtype=torch.float32, device=device)
        if params.min_tokens:
            stop = sorted({*eos_token_ids, *params.stop_token_ids})
            state.stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
        if params.grammar is not None:
            state.matcher = grammars.matcher(params.grammar)
            state.utf8 = grammars.utf8
            state.eos_ids = tuple(sorted(eos_token_ids))
            if params.grammar.kind.startswith("json"):
                banned = grammars.control_token_ids
                state.banned_ids = torch.tensor(banned, dtype=torch.long, device=device)
        return state


class Constrained(Protocol):
    """What the processors read of a sequence (server.engine.sequence.Sequence is one)."""

    request_id: str
    logits: LogitsState | None

    @property
    def num_output_tokens(self) -> int: ...


def apply_logits_processors(logits: torch.Tensor, seqs: Sequence[Constrained]) -> None:
    """In place. logits: [S, vocab] float32, one row per sequence in seqs."""
    rows = [(row, seq.logits) for row, seq in enumerate(seqs) if seq.logits is not None]
    if not rows:
        return
    constrained: list[tuple[int, LogitsState]] = []
    for row, state in rows:
        if state.bias_ids is not None:
            logits[row, state.bias_ids] += state.bias_values
        if state.stop_ids is not None and seqs[row].num_output_tokens < state.min_tokens:
            logits[row, state.stop_ids] = float("-inf")
        if state.banned_ids is not None:
            logits[row, state.banned_ids] = float("-inf")
        if state.matcher is not None:
            constrained.append((row, state))
    if constrained:
        apply_grammar_masks(logits, constrained)


def apply_grammar_masks(logits: torch.Tensor, constrained: list[tuple[int, LogitsState]]) -> None:
    """-inf on each constrained row's tokens its grammar does not allow next."""
    num_rows, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)  # [S, ceil(vocab / 32)] int32
    rows = [row for row, _ in constrained]
    live: list[tuple[int, xgr.GrammarMatcher]] = []
    for row, state in constrained:
        assert state.matcher is not None
        if state.matcher.is_terminated():
            bitmask[row] = 0  # no next mask: a dead end, handled below
        else:
            live.append((row, state.matcher))
    if live:
        matchers = [m for _, m in live]
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, [r for r, _ in live])
        _narrow_to_valid_utf8(bitmask, constrained)
    # A grammar that allows nothing (a schema no value satisfies) would leave a row of -inf:
    # let it end instead, so one bad request never breaks the step.
    dead = (bitmask[rows] == 0).all(dim=1).tolist()
    for (row, state), is_dead in zip(constrained, dead, strict=True):
        if is_dead:
            logger.warning("grammar dead end at row %d; ending the sequence", row)
            for token in state.eos_ids:
                bit = 1 << (token % 32)
                bitmask[row, token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab, indices=rows
    )


def _narrow_to_valid_utf8(
    bitmask: torch.Tensor, constrained: list[tuple[int, LogitsState]]
) -> None:
    """In place: clear the bits of tokens that would make a row's output invalid UTF-8.
    bitmask: [S, words] int32 on the CPU, as xgrammar fills it."""
    guarded = [(row, state) for row, state in constrained if state.utf8 is not None]
    if not guarded:
        return
    guard = guarded[0][1].utf8
    assert guard is not None and all(state.utf8 is guard for _, state in guarded)
    assert bitmask.shape[1] == guard.allowed_bitmask.shape[1], "vocab sizes differ"
    rows = torch.tensor([row for row, _ in guarded])
    states = torch.tensor([state.utf8_state for _, state in guarded])
    bitmask[rows] &= guard.allowed_bitmask[states]


@functools.cache
def _batch_matcher() -> xgr.BatchGrammarMatcher:
    """Fills many rows' masks in one call, on xgrammar's own threads (one per core at most)."""
    return xgr.BatchGrammarMatcher(max_threads="auto")


def accept_token(seq: Constrained, token_id: int) -> None:
    """Advance the sequence's grammar past its new token (engine thread, after sampling)."""
    state = seq.logits
    if state is None or state.matcher is None:
        return
    if not state.matcher.accept_token(token_id):  # only past a dead end
        logger.warning("request %s: token %d is outside its grammar", seq.request_id, token_id)
    if state.utf8 is not None:
        state.utf8_state = state.utf8.next_state[state.utf8_state][token_id]
