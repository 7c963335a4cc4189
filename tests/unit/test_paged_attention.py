"""The Triton paged attention computes what SDPA computes over each sequence's live keys.

The pool is filled with NaN outside the live slots (and the tails of the last pages, the spare
pages and the table padding point at NaN), so any read of a slot a query may not see shows up.
Without a GPU the kernels run in Triton's interpreter; bfloat16 is left to tests/gpu.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from server.kernels.paged_attention import (
    decode_partitions,
    paged_attention,
    paged_attention_ref,
    store_kv,
)
from tests.kernel_cases import assert_close, kernel_device, paged_batch

DEVICE = kernel_device()
if DEVICE is None:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# (q_lens, ctx_lens, block_size, heads, kv_heads, head_dim, window)
CASES = {
    "decode-gqa4-block16": ([1, 1, 1], [1, 17, 40], 16, 8, 2, 16, None),
    "decode-mha-block1": ([1, 1], [3, 9], 1, 4, 4, 16, None),
    "decode-gqa8-block5": ([1, 1, 1], [4, 5, 23], 5, 8, 1, 32, None),
    "prefill-gqa4-block16": ([20, 7], [20, 7], 16, 8, 2, 16, None),
    "chunked-prefill-over-prefix": ([9, 16], [30, 50], 8, 4, 1, 32, None),
    "mixed-decode-and-prefill": ([1, 12, 1, 5], [33, 12, 7, 21], 16, 8, 2, 16, None),
    "mixed-gqa8-head-dim-48": ([1, 6], [18, 70], 32, 8, 1, 48, None),
    "window-decode": ([1, 1], [5, 40], 16, 4, 2, 16, 8),
    "window-prefill-block5": ([25, 1], [25, 19], 5, 8, 2, 16, 6),
    "window-chunk-over-prefix": ([10, 1], [45, 30], 16, 4, 1, 32, 12),
    "window-of-one": ([4, 1], [9, 3], 4, 4, 2, 16, 1),
}
DTYPES = (torch.float32, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_over_the_live_keys(case, dtype):
    q_lens, ctx_lens, block, heads, kv_heads, dim, window = CASES[case]
    batch = paged_batch(q_lens, ctx_lens, block, heads, kv_heads, dim, dtype, DEVICE)
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    ref = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    assert not out.isnan().any(), "a NaN outside the live slots reached the output"
    assert_close(out, ref, dtype)


# Decodes long enough for several key tiles, so partitions hold different numbers of them
# (some empty: the shorter sequences end, or their window starts, in an earlier partition).
SPLIT_CASES = {
    "gqa4-block16": ([1, 1, 1], [1, 130, 300], 16, 8, 2, 16, None),
    "gqa3-padded-group": ([1, 1], [77, 260], 16, 6, 2, 64, None),
    "mha-block5": ([1, 1], [3, 190], 5, 4, 4, 32, None),
    "window": ([1, 1, 1], [40, 200, 333], 16, 8, 2, 16, 50),
}


@pytest.mark.parametrize("num_parts", [None, 1, 2, 7])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_keys_decode_matches_sdpa(case, num_parts):
    """Split-KV: partitions of each decode's keys, combined by the reduce kernel (None: the
    launcher's own choice, which splits these; 1: one program per sequence and KV head)."""
    q_lens, ctx_lens, block, heads, kv_heads, dim, window = SPLIT_CASES[case]
    batch = paged_batch(q_lens, ctx_lens, block, heads, kv_heads, dim, torch.float32, DEVICE)
    if num_parts is None:
        keys = batch.seqs.block_tables.shape[1] * block
        assert decode_partitions(len(q_lens), kv_heads, keys, 64, 132)[0] > 1
    args = (batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    out = paged_attention(*args, num_parts=num_parts)
    assert not out.isnan().any(), "a NaN outside the live slots reached the output"
    assert_close(out, paged_attention_ref(*args), torch.float32)


def test_few_decodes_split_their_keys_and_many_do_not():
    block_n, sms = 64, 132
    assert decode_partitions(1, 8, 4096, block_n, sms) == (32, 128)  # 256 programs: ~2 per SM
    assert decode_partitions(4, 8, 4096, block_n, sms) == (8, 512)
    assert decode_partitions(32, 8, 4096, block_n, sms) == (1, 4096)  # 256 programs already
    assert decode_partitions(1, 8, 40, block_n, sms) == (1, 64)  # one key tile: nothing to split


def test_decode_never_reads_keys_before_its_window():
    window = 8
    batch = paged_batch([1, 1], [40, 21], 4, 4, 2, 16, torch.float32, DEVICE)
    ref = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    for b, ctx in enumerate(batch.seqs.ctx_lens.tolist()):
        for pos in range(ctx - window):  # keys the decode query may no longer see
            page = int(batch.seqs.block_tables[b, pos // 4])
            batch.k_cache[page, pos % 4] = float("nan")
            batch.v_cache[page, pos % 4] = float("nan")
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    assert_close(out, ref, torch.float32)


def test_store_kv_writes_exactly_the_slot_mapping():
    batch = paged_batch([1], [1], 4, 4, 2, 16, torch.float32, DEVICE)
    k_cache, v_cache = batch.k_cache, batch.v_cache
    before_k, before_v = k_cache.clone(), v_cache.clone()
    pages = torch.tensor([2, 0, 2, 3], device=DEVICE)
    offsets = torch.tensor([3, 0, 1, 2], device=DEVICE)
    k = torch.randn(4, 2, 16, device=DEVICE)
    v = torch.randn(4, 2, 16, device=DEVICE)
    store_kv(k, v, k_cache, v_cache, pages, offsets)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    written[pages, offsets] = True
    torch.testing.assert_close(k_cache[pages, offsets], k)
    torch.testing.assert_close(v_cache[pages, offsets], v)
    torch.testing.assert_close(k_cache[~written], before_k[~written], equal_nan=True)
    torch.testing.assert_close(v_cache[~written], before_v[~written], equal_nan=True)


def test_store_kv_then_attend_sees_the_new_tokens():
    """A decode step: the new key is written by store_kv and is the query's own position."""
    batch = paged_batch([1], [6], 4, 4, 2, 16, torch.float32, DEVICE)
    page = int(batch.seqs.block_tables[0, 1])
    k_new = torch.randn(1, 2, 16, device=DEVICE)
    v_new = torch.randn(1, 2, 16, device=DEVICE)
    slot_pages = torch.tensor([page], device=DEVICE)
    slot_offsets = torch.tensor([1], device=DEVICE)  # position 5 = block 1, offset 1
    store_kv(k_new, v_new, batch.k_cache, batch.v_cache, slot_pages, slot_offsets)
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.seqs)
    ref = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.seqs)
    assert_close(out, ref, torch.float32)
    assert torch.equal(batch.v_cache[page, 1], v_new[0])


def test_decode_layer_matches_the_sdpa_serving_path():
    """The kernel path of a layer (store + attend) against Attention._paged, the torch path."""
    from bench.kernels_attention import decode_step
    from server.kernels.paged_attention import paged_attention_layer

    attn, (q, k, v), meta = decode_step(3, 37, 16, torch.float32, 0, DEVICE)
    kv = (attn.k_cache, attn.v_cache)
    want = attn._paged(q, k, v, meta)
    # The same step again on the kernel path: it rewrites the same slots with the same K/V.
    got = paged_attention_layer(q, k, v, *kv, meta, None)
    assert_close(got, want, torch.float32)
