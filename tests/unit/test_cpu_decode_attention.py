"""The CPU decode attention kernel (server/kernels/cpu/paged_decode.c) against the torch path
it replaces: SDPA over the pages gathered out of the pool (Attention._paged)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from server.kernels import cpu_kernels
from server.model.attention import Attention
from server.model.context import AttentionGroup, AttentionMetadata

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)

LAYERS, LAYER, BLOCK = 3, 1, 16


@pytest.fixture(scope="module")
def kernel():  # type: ignore[no-untyped-def]
    return cpu_kernels.CPUKernels(cpu_kernels.build()).decode_attention


def _step(ctx_lens: list[int], heads: int, kv_heads: int, dim: int, seed: int = 0):
    """A decode step over a pool laid out as the page pool lays it ([pages, layers, 2, block,
    kv, dim]), pages handed out at random; the new tokens' K/V not yet written."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BLOCK) for n in ctx_lens]
    num_pages = sum(blocks) + 5
    pool = torch.randn(num_pages, LAYERS, 2, BLOCK, kv_heads, dim, generator=gen)
    pages = torch.randperm(num_pages, generator=gen).tolist()
    tables, at = [], 0
    for b in blocks:
        tables.append(pages[at : at + b])
        at += b
    width = max(blocks)
    table = torch.tensor([t + t[:1] * (width - len(t)) for t in tables])
    ctx = torch.tensor(ctx_lens)
    batch = len(ctx_lens)
    k_range = torch.arange(width * BLOCK)
    group = AttentionGroup(
        q_index=torch.arange(batch)[:, None],
        valid_rows=torch.arange(batch),
        out_index=torch.arange(batch),
        block_tables=table,
        mask=(k_range[None, :] < ctx[:, None]).view(batch, 1, 1, -1),
        ctx_lens=ctx,
    )
    last = ctx - 1
    meta = AttentionMetadata(table[torch.arange(batch), last // BLOCK], last % BLOCK, [group])
    attn = Attention(heads, kv_heads, dim, None)
    attn.k_cache, attn.v_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]
    q = torch.randn(batch, heads, dim, generator=gen)
    k = torch.randn(batch, kv_heads, dim, generator=gen)
    v = torch.randn(batch, kv_heads, dim, generator=gen)
    return attn, (q, k, v), meta, pool


def _both(attn: Attention, qkv, meta, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path's output, then the kernel's, for the same step (the KV write is
    idempotent: both write the same new K/V to the same slots)."""
    attn.decode_kernel = None
    want = attn._paged(*qkv, meta)
    attn.decode_kernel = kernel
    got = attn._paged(*qkv, meta)
    return want, got


@pytest.mark.parametrize(
    ("ctx_lens", "heads", "kv_heads", "dim"),
    [
        ([1, 15, 16, 17, 100], 9, 3, 64),  # SmolLM2's shape; lengths at block edges
        ([33, 7], 4, 4, 16),  # no grouping (MHA)
        ([50, 64, 2], 8, 2, 32),  # 4 query heads per KV head
        ([257], 6, 1, 128),  # MQA, a long context
        ([20, 9, 31], 4, 2, 40),  # head_dim not a multiple of 16: the dot products' scalar tail
    ],
)
def test_matches_sdpa_over_gathered_pages(kernel, ctx_lens, heads, kv_heads, dim) -> None:
    attn, qkv, meta, _ = _step(ctx_lens, heads, kv_heads, dim)
    want, got = _both(attn, qkv, meta, kernel)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_sliding_window_sees_only_the_last_keys(kernel) -> None:
    attn, qkv, meta, _ = _step([5, 40, 70], 6, 2, 32, seed=1)
    window = 24
    attn.sliding_window = window
    g = meta.groups[0]
    k_range = torch.arange(g.mask.shape[-1])
    ctx = g.ctx_lens[:, None]
    g.mask = ((k_range < ctx) & (k_range >= ctx - window)).view(len(ctx), 1, 1, -1)
    want, got = _both(attn, qkv, meta, kernel)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_never_reads_past_a_sequence_keys_or_other_pages(kernel) -> None:
    """NaN everywhere a sequence does not own (other pages, slots past its keys, the other
    layers): the outputs are those of a clean pool."""
    attn, qkv, meta, pool = _step([3, 18, 40], 9, 3, 64, seed=2)
    attn.decode_kernel = kernel
    clean = attn._paged(*qkv, meta).clone()
    g = meta.groups[0]
    owned = torch.zeros(pool.shape[0], BLOCK, dtype=torch.bool)
    for b, n in enumerate(g.ctx_lens.tolist()):
        for j in range(n):
            owned[g.block_tables[b, j // BLOCK], j % BLOCK] = True
    for layer in range(LAYERS):
        for kv in (0, 1):
            pool[:, layer, kv][~owned] = float("nan")
    pool[:, LAYER - 1] = float("nan")
    pool[:, LAYER + 1] = float("nan")
    assert torch.equal(attn._paged(*qkv, meta), clean)


def test_a_non_finite_key_spoils_only_its_own_sequence(kernel) -> None:
    attn, qkv, meta, _ = _step([10, 10], 4, 2, 16, seed=3)
    g = meta.groups[0]
    attn.k_cache[g.block_tables[0, 0], 2, 1] = float("nan")  # sequence 0's key 2, KV head 1
    want, got = _both(attn, qkv, meta, kernel)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5, equal_nan=True)
    out = got.view(2, 4, 16)
    assert out[0, 2:].isnan().all()  # the query heads of KV head 1
    assert out[0, :2].isfinite().all() and out[1].isfinite().all()


def test_the_build_is_cached_and_shares_pytorchs_openmp(kernel, tmp_path: Path) -> None:
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    # One OpenMP runtime in the process: the kernel's threads are the calling thread's team.
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_without_a_compiler_the_torch_path_stays(monkeypatch, tmp_path: Path, caplog) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    with caplog.at_level("WARNING"):
        assert cpu_kernels.load() is None
        assert cpu_kernels.load() is None  # tried once
    assert caplog.text.count("keeps torch's ops") == 1 and "does not run" in caplog.text


def test_a_cpu_float32_engine_decodes_through_the_kernel_as_through_sdpa(
    kernel, tiny_model_dir, make_engine
) -> None:
    """The torch backend binds the kernel on a CPU in float32; greedy tokens of a batch are the
    same as with the gather + SDPA path (the engine's exactness tests run through it too)."""
    from server.engine.sampling_params import SamplingParams

    engine = make_engine(tiny_model_dir("llama"))
    layers = engine.runner.model.attention_layers()
    assert all(layer.decode_kernel is not None for layer in layers)
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34], [7]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with_kernel = [o.token_ids for o in engine.generate(prompts, params)]
    for layer in layers:
        layer.decode_kernel = None
    assert [o.token_ids for o in engine.generate(prompts, params)] == with_kernel
