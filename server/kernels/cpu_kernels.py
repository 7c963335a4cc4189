"""The CPU path's own kernels (server/kernels/cpu/*.c), through ctypes.

- decode attention reading K/V in place from the block tables (cpu/paged_decode.c): the
  torch path copies every sequence's pages out of the pool and runs SDPA over the padded
  copy; at SmolLM2's decode batch of 64 that copy and SDPA's second read of it were 31% of a
  step;
- batched LoRA for short segments (cpu/lora_segments.c): the torch path's matmul and addmm
  per segment and slice were thousands of tiny calls per decode step with 32 adapters.

They are compiled together at first use with the system's C compiler (`cc`, FLAGS below;
`-fopenmp` links the OpenMP runtime PyTorch loaded, so a kernel runs on the calling thread's
team) and cached under the loraplex cache folder, keyed by the
sources, the compiler and this CPU. Without a compiler the torch path stays: load() says why
and returns None.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Protocol

import torch

from server.model.gguf_convert import cache_root

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.c"))
# -ffp-contract=fast: a * b + c as one fused multiply-add (ISO C mode leaves them apart);
# -Wno-psabi: 64-byte vector types in static functions are no ABI (CPUs without AVX-512).
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-Wno-psabi", "-fopenmp", "-fPIC"]
FLAGS += ["-shared", "-std=c11"]
_i64, _f32p = ctypes.c_int64, ctypes.c_void_p


class KernelBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded here."""


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelBuildError("no C compiler (cc or gcc) on PATH")
    return cc


def build(cache: Path | None = None) -> Path:
    """The compiled kernel's path, compiling it first when this source, compiler and CPU have
    none cached; raises KernelBuildError."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"the C compiler {cc} does not run: {exc}") from exc
    parts = [*(src.read_text() for src in SOURCES), " ".join(FLAGS), version.stdout]
    key = hashlib.sha256("\0".join([*parts, _cpu_identity()]).encode()).hexdigest()[:16]
    folder = (cache or cache_root()) / "cpu-kernels" / key
    target = folder / "loraplex_cpu.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise KernelBuildError(f"{Path(cc).name} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: concurrent builders each write whole files
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the CPU kernels (%s)", target)
    return target


class CPUKernels:
    """The compiled library: decode attention and short-segment LoRA."""

    def __init__(self, library: Path) -> None:
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise KernelBuildError(f"the compiled kernels do not load: {exc}") from exc
        attend = lib.paged_decode_attention
        attend.argtypes = [_f32p, _f32p, _f32p, _i64, _i64, _f32p, _i64, _f32p]
        attend.argtypes += [_i64] * 6 + [ctypes.c_float, _f32p]
        attend.restype = ctypes.c_int
        lora = lib.lora_short_segments
        lora.argtypes = [_f32p, _i64, _f32p, _i64, _f32p, _f32p, _f32p, _i64]
        lora.argtypes += [_f32p] * 4 + [_i64, _f32p, _f32p, _i64]
        lora.restype = ctypes.c_int
        self._attend, self._lora = attend, lora

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        ctx_lens: torch.Tensor,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """q: [B, heads, dim]; k_cache, v_cache: [pages, block, kv_heads, dim] views of the
        pool; block_tables: [B, max_blocks] int64; ctx_lens: [B] int64 -> [B, heads, dim]."""
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, _ = k_cache.shape
        inner = (num_kv_heads * head_dim, head_dim, 1)
        assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32, "float32 only"
        assert k_cache.stride()[1:] == inner and v_cache.stride() == k_cache.stride()
        assert block_tables.dtype == ctx_lens.dtype == torch.int64
        q, tables, lens = q.contiguous(), block_tables.contiguous(), ctx_lens.contiguous()
        out = torch.empty_like(q)
        status = self._attend(
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k_cache.stride(0),
            k_cache.stride(1),
            tables.data_ptr(),
            tables.shape[1],
            lens.data_ptr(),
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            sliding_window or 0,
            head_dim**-0.5,
            out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the CPU decode attention kernel could not allocate its scores")
        return out

    def lora_short_segments(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        pool: torch.Tensor,
        seg: SegmentTables,
        slice_offsets: torch.Tensor,
        slice_widths: torch.Tensor,
        max_len: int,
    ) -> None:
        """out += each token's adapter delta, for the segments of at most max_len tokens.

        x: [T, in] and out: [T, N] float32, contiguous; pool: the flat page pool; seg: the
        step's per-segment tables for this linear; slice_offsets, slice_widths: [S] int64."""
        assert x.is_contiguous() and out.is_contiguous() and pool.is_contiguous()
        assert x.dtype == out.dtype == pool.dtype == torch.float32, "float32 only"
        assert seg.ranks.dtype == torch.int32 and seg.scalings.dtype == torch.float32
        tables = [t.contiguous() for t in (seg.a_offsets, seg.b_offsets, seg.ranks, seg.scalings)]
        status = self._lora(
            x.data_ptr(),
            x.shape[1],
            out.data_ptr(),
            out.shape[1],
            pool.data_ptr(),
            seg.seg_starts.data_ptr(),
            seg.seg_lens.data_ptr(),
            seg.seg_starts.shape[0],
            *(t.data_ptr() for t in tables),
            slice_offsets.shape[0],
            slice_offsets.data_ptr(),
            slice_widths.data_ptr(),
            max_len,
        )
        if status != 0:
            raise MemoryError("the CPU LoRA kernel could not allocate its buffers")


class SegmentTables(Protocol):
    """What the LoRA kernel reads of server.lora.ops.SegmentTensors (G segments, S slices)."""

    seg_starts: torch.Tensor  # [G] int64
    seg_lens: torch.Tensor  # [G] int64
    a_offsets: torch.Tensor  # [G, S] int64
    b_offsets: torch.Tensor  # [G, S] int64
    ranks: torch.Tensor  # [G, S] int32
    scalings: torch.Tensor  # [G, S] float32


def supports_attention(dtype: torch.dtype) -> bool:
    """Whether the decode attention kernel handles this serving dtype (any head grouping)."""
    return dtype == torch.float32


_loaded: dict[str, CPUKernels | None] = {}  # "kernels" -> the library, or None: it failed
_lock = threading.Lock()


def load() -> CPUKernels | None:
    """The kernels, built if need be (tried once per process); None, and a warning saying
    why, where they cannot be."""
    with _lock:
        if "kernels" not in _loaded:
            try:
                _loaded["kernels"] = CPUKernels(build())
            except (KernelBuildError, OSError) as exc:
                logger.warning("the CPU path keeps torch's ops (no C kernels): %s", exc)
                _loaded["kernels"] = None
        return _loaded["kernels"]
