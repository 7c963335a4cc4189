"""S2-Attn (LongLoRA): equal to masked dense attention, no future leakage, training only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.loader import load_model
from server.training.s2attn import (
    enable_s2_attention,
    group_size_for,
    s2_attention,
    s2_mask,
    shift,
    unshift,
)

SHAPES = [  # (batch, heads, kv_heads, seq_len, group_size)
    (2, 4, 4, 32, 8),
    (1, 8, 2, 64, 16),  # GQA
    (2, 6, 1, 24, 6),  # MQA, odd group count of half-groups
    (1, 2, 2, 16, 16),  # a single group
]


def _qkv(batch, heads, kv_heads, seq_len, dim=8, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, dtype=torch.float64)
    return q, k, v


def _wrapping_s2(q, k, v, group_size):  # type: ignore[no-untyped-def]
    """The reference implementation's roll: its last shifted group wraps around."""
    batch, heads, seq_len, dim = q.shape
    rep = heads // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    q, k, v = (shift(t, group_size) for t in (q, k, v))
    n = seq_len // group_size
    out = F.scaled_dot_product_attention(
        *(t.reshape(batch, heads, n, group_size, dim) for t in (q, k, v)), is_causal=True
    )
    return unshift(out.reshape(batch, heads, seq_len, dim), group_size)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "seq_len", "group"), SHAPES)
def test_s2_attention_equals_dense_attention_under_its_group_mask(
    batch, heads, kv_heads, seq_len, group
):
    q, k, v = _qkv(batch, heads, kv_heads, seq_len)
    mask = s2_mask(seq_len, heads, group, q.device)
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
    )
    torch.testing.assert_close(s2_attention(q, k, v, group), want, rtol=0, atol=1e-12)


def test_group_mask_has_half_groups_at_both_ends_for_shifted_heads():
    mask = s2_mask(16, 2, 8, torch.device("cpu"))
    plain, shifted = mask[0], mask[1]
    assert plain[7, 0] and not plain[8, 7]  # plain groups [0, 8), [8, 16)
    assert shifted[3, 0] and not shifted[4, 3]  # shifted: [0, 4), [4, 12), [12, 16)
    assert shifted[11, 4] and not shifted[12, 11]
    assert not shifted[:4, 12:].any() and not shifted[12:, :4].any()  # no wrap-around


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "seq_len", "group"), SHAPES)
def test_perturbing_a_later_token_never_changes_an_earlier_output(
    batch, heads, kv_heads, seq_len, group
):
    q, k, v = _qkv(batch, heads, kv_heads, seq_len)
    base = s2_attention(q, k, v, group)
    for t in (seq_len - 1, seq_len - group // 2, seq_len // 2):
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[:, :, t] += 3.0
        v2[:, :, t] -= 2.0
        q2[:, :, t] *= -1
        out = s2_attention(q2, k2, v2, group)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=0)


def test_the_leakage_check_catches_the_wrapping_variant():
    # The reference roll lets the first half-group see the last tokens; the check above fails
    # for it, so it would fail for an implementation that wrapped.
    q, k, v = _qkv(1, 4, 4, 32)
    base = _wrapping_s2(q, k, v, 8)
    v2 = v.clone()
    v2[:, :, -1] += 1.0
    assert not torch.equal(_wrapping_s2(q, k, v2, 8)[:, :, :4], base[:, :, :4])


@pytest.mark.parametrize("seq_len", [8, 24, 64])
def test_shift_then_unshift_is_identity(seq_len):
    x = torch.randn(2, 5, seq_len, 3)
    group = seq_len // 4
    assert torch.equal(unshift(shift(x, group), group), x)
    assert not torch.equal(shift(x, group), x)
    assert torch.equal(shift(x, group)[:, :2], x[:, :2])  # the first half of heads stays


def test_group_size_must_tile_the_sequence():
    assert group_size_for(64, 4) == 16
    with pytest.raises(AssertionError, match="multiple of 8"):
        group_size_for(60, 4)


def test_gradients_flow_through_s2_attention():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 16))
    s2_attention(q, k, v, 4).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama")


def _hidden(model, ids):  # type: ignore[no-untyped-def]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions)


def test_model_in_eval_mode_equals_the_vanilla_model(tiny_llama):
    vanilla = load_model(tiny_llama, torch.float32)
    s2 = load_model(tiny_llama, torch.float32)
    enable_s2_attention(s2, num_groups=4)
    ids = torch.randint(3, 300, (2, 32))
    s2.eval()
    torch.testing.assert_close(_hidden(s2, ids), _hidden(vanilla, ids), rtol=0, atol=0)


def test_model_in_train_mode_uses_s2_attention(tiny_llama):
    vanilla = load_model(tiny_llama, torch.float32).train()
    s2 = load_model(tiny_llama, torch.float32)
    enable_s2_attention(s2, num_groups=4)
    s2.train()
    ids = torch.randint(3, 300, (1, 32))
    got, dense = _hidden(s2, ids), _hidden(vanilla, ids)
    # The first group (and first half-group) see the same keys either way; later tokens do not.
    torch.testing.assert_close(got[:, :4], dense[:, :4])
    assert not torch.allclose(got[:, 8:], dense[:, 8:])
