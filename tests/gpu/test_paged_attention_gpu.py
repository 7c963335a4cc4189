"""On a GPU, in fp16 and bf16: paged attention at head_dim 128 equals SDPA over the live keys,
with NaN in every slot outside them. Skipped without CUDA (tests/unit covers the interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from server.kernels.paged_attention import paged_attention, paged_attention_ref
from tests.kernel_cases import assert_close, paged_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = torch.device("cuda")
# (q_lens, ctx_lens, block_size, heads, kv_heads, window)
CASES = {
    "decode-gqa4": ([1] * 8, [1, 15, 16, 17, 100, 257, 600, 1000], 16, 32, 8, None),
    "decode-gqa8-block32": ([1] * 4, [31, 33, 500, 900], 32, 32, 4, None),
    "decode-mha": ([1] * 3, [5, 64, 300], 16, 8, 8, None),
    "prefill-gqa4": ([300, 77], [300, 77], 16, 32, 8, None),
    "chunked-prefill-and-decodes": ([128, 1, 1, 40], [400, 90, 1, 40], 16, 32, 8, None),
    "odd-block-size": ([1, 50], [123, 70], 24, 32, 8, None),
    "window-decode": ([1, 1], [700, 100], 16, 32, 8, 256),
    "window-prefill": ([333, 1], [600, 400], 16, 32, 8, 128),
}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_over_the_live_keys(case, dtype):
    q_lens, ctx_lens, block, heads, kv_heads, window = CASES[case]
    batch = paged_batch(q_lens, ctx_lens, block, heads, kv_heads, 128, dtype, DEVICE)
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    ref = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.seqs, window)
    assert not out.isnan().any()
    assert_close(out, ref, dtype)
