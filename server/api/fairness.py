"""Per-tenant bounds on generation work in flight: sequences and prompt tokens.

A tenant is the API key that authenticated a request ("key:admin", "key:inference"), or on a
keyless server the client's address. Beyond its bound a tenant's next request is a 429 (a
request that could never fit is a 400), so one tenant cannot fill the engine's queue or its
prefill work alone; the scheduler's fair order (server.engine.scheduler) then interleaves
what each tenant has queued.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from fastapi import Request

from server.api.auth import presents_a_key
from server.api.auth import tenant as key_tenant
from server.api.errors import BadRequest, Overloaded


def fairness_tenant(request: Request) -> str:
    """The tenant a request's work counts against (see the module docstring)."""
    key = key_tenant(request)
    if key:
        return f"key:{key}"
    return _client(request)


def slot_tenant(request: Request) -> str:
    """The tenant a request's concurrency slot counts against: fairness_tenant, except that
    on a keyed server a request without a valid key counts as its client's address (it is
    refused with 401 once routed, and until then must not take a key's share)."""
    if key_tenant(request) and not presents_a_key(request):
        return _client(request)
    return fairness_tenant(request)


def _client(request: Request) -> str:
    client = request.client
    return f"client:{client.host if client else '?'}"


@dataclass
class Claim:
    """Work a request holds against its tenant's bound until release()."""

    budget: TenantBudget
    tenant: str
    sequences: int
    prompt_tokens: int
    released: bool = False

    def release(self) -> None:
        """Give the work back (idempotent: the stream's end and its collection both call it)."""
        if not self.released:
            self.released = True
            self.budget._give_back(self)


class TenantBudget:
    """Sequences and prompt tokens in flight per tenant, within max_sequences and
    max_prompt_tokens each."""

    def __init__(self, max_sequences: int, max_prompt_tokens: int) -> None:
        self.max_sequences = max_sequences
        self.max_prompt_tokens = max_prompt_tokens
        self._sequences: defaultdict[str, int] = defaultdict(int)
        self._prompt_tokens: defaultdict[str, int] = defaultdict(int)

    def in_flight(self, tenant: str) -> tuple[int, int]:
        """(sequences, prompt tokens) the tenant has in flight now."""
        return self._sequences.get(tenant, 0), self._prompt_tokens.get(tenant, 0)

    def claim(self, tenant: str, sequences: int, prompt_tokens: int) -> Claim:
        """Count a request's work against its tenant; 400 if it could never fit, 429 if it
        does not fit now."""
        if sequences > self.max_sequences:
            raise BadRequest(
                f"this request has {sequences} sequences (prompts x n); one key may have at "
                f"most {self.max_sequences} in flight (--max-key-sequences)",
                "n",
            )
        if prompt_tokens > self.max_prompt_tokens:
            raise BadRequest(
                f"this request has {prompt_tokens} prompt tokens (prompts x n); one key may "
                f"have at most {self.max_prompt_tokens} in flight (--max-key-prompt-tokens)",
                "prompt",
            )
        seqs, tokens = self.in_flight(tenant)
        if seqs + sequences > self.max_sequences or tokens + prompt_tokens > (
            self.max_prompt_tokens
        ):
            raise Overloaded(
                f"this key already has {seqs} sequences and {tokens} prompt tokens in flight "
                f"(--max-key-sequences {self.max_sequences}, --max-key-prompt-tokens "
                f"{self.max_prompt_tokens}); retry when some finish",
                headers={"Retry-After": "1"},
            )
        self._sequences[tenant] += sequences
        self._prompt_tokens[tenant] += prompt_tokens
        return Claim(self, tenant, sequences, prompt_tokens)

    def _give_back(self, claim: Claim) -> None:
        tenant = claim.tenant
        self._sequences[tenant] -= claim.sequences
        self._prompt_tokens[tenant] -= claim.prompt_tokens
        if self._sequences[tenant] <= 0:  # no entry kept for a tenant with nothing in flight
            del self._sequences[tenant]
            del self._prompt_tokens[tenant]
