"""A request prepared for one version of an adapter (a chat rendered with its template) runs
on that version's weights even after an in-place reload, or fails with a clear error when
that version is gone; it never runs another version's weights."""

from __future__ import annotations

import pytest

from server.engine.errors import AdapterVersionGoneError
from tests.unit.test_prefix_cache import GREEDY, _turn, adapter_dirs, engines  # noqa: F401


def test_a_pinned_request_runs_on_the_version_it_was_prepared_for(engines, adapter_dirs):  # noqa: F811
    engine = engines(True)
    prompt = _turn(2)
    old = engine.registry.get("attn").adapter_id
    old_text = engine.generate([prompt], GREEDY, ["attn"])[0].token_ids
    engine.registry.reload_dir("attn", adapter_dirs["attn2"])  # old version still held
    seq = engine.requests.make(prompt, GREEDY, adapter_name="attn", adapter_id=old)
    assert seq.adapter_id == old
    engine.add_sequence(seq)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final is not None and final.token_ids == old_text
    # Unpinned, the same prompt gets the new version.
    assert engine.generate([prompt], GREEDY, ["attn"])[0].token_ids != old_text


def test_a_pinned_request_fails_clearly_once_its_version_is_gone(engines, adapter_dirs):  # noqa: F811
    engine = engines(True)
    old = engine.registry.get("attn").adapter_id
    made = engine.requests.make(_turn(3), GREEDY, adapter_name="attn", adapter_id=old)
    _, retired = engine.registry.reload_dir("attn", adapter_dirs["attn2"])
    engine.retire_adapter(retired.adapter_id)  # no request uses it: freed at once
    with pytest.raises(AdapterVersionGoneError, match="reloaded while this request"):
        engine.requests.make(_turn(3), GREEDY, adapter_name="attn", adapter_id=old)
    with pytest.raises(AdapterVersionGoneError):
        engine.add_sequence(made)
    assert engine.num_requests == 0
