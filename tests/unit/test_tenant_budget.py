"""Per-tenant bounds on work in flight: over the bound now is a 429, past it for good a 400,
and released work makes room again; tenants do not share a bound."""

from __future__ import annotations

import pytest

from server.api.errors import BadRequest, Overloaded
from server.api.fairness import TenantBudget


def test_a_tenant_past_its_bound_is_refused_until_its_work_ends() -> None:
    budget = TenantBudget(max_sequences=8, max_prompt_tokens=1000)
    first = budget.claim("key:inference", 6, 600)
    with pytest.raises(Overloaded, match="--max-key-sequences 8"):
        budget.claim("key:inference", 3, 10)
    with pytest.raises(Overloaded, match="600 prompt tokens"):
        budget.claim("key:inference", 1, 401)
    other = budget.claim("key:admin", 8, 1000)  # another tenant has its own bound
    first.release()
    first.release()  # idempotent: the stream's end and its collection both call it
    assert budget.in_flight("key:inference") == (0, 0)
    budget.claim("key:inference", 8, 1000)
    other.release()
    assert budget.in_flight("key:admin") == (0, 0)


def test_a_request_that_could_never_fit_is_a_bad_request() -> None:
    budget = TenantBudget(max_sequences=8, max_prompt_tokens=1000)
    with pytest.raises(BadRequest, match="--max-key-sequences") as err:
        budget.claim("client:127.0.0.1", 9, 10)
    assert err.value.param == "n"
    with pytest.raises(BadRequest, match="--max-key-prompt-tokens") as err:
        budget.claim("client:127.0.0.1", 1, 1001)
    assert err.value.param == "prompt"
