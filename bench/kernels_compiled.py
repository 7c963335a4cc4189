"""Every kernel variant the engine launches, compiled for a GPU without one: registers, spills,
shared memory and blocks per SM.

    python -m bench.kernels_compiled [--targets sm_90 sm_80] [--models ...] [--jobs 2]
                                     [--json out.json] [--markdown]

Launches come from bench.kernel_variants (the project's launchers driven with recorders, on
real model shapes). Triton's own binder specialises each one for the target (constexprs,
num_warps/num_stages, which integers are 1 or multiples of 16, which pointers are 16-byte
aligned); each distinct specialisation is compiled once by triton.compile through the ptxas in
the triton wheel, in parallel processes. ptxas' report gives registers, spill bytes and static
shared memory, cuobjdump's SASS the main loop's instruction count; blocks per SM follow from
registers, shared memory and warps against the target's limits (the CUDA occupancy
calculator's rules). Exit status 1 if any variant fails to compile, spills, or exceeds a
limit. Must run without TRITON_INTERPRET (it needs JITFunctions). --from-json reprints a saved
report (--summary: one line per kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.kernel_variants import DTYPES, MODELS, Launch, ServingShape, record


@dataclass(frozen=True)
class TargetLimits:
    """What one SM of a target offers a kernel (CUDA programming guide, compute capabilities)."""

    name: str
    capability: int
    smem_per_sm: int  # bytes
    smem_per_block: int  # bytes, the opt-in maximum
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024  # the driver's share, per resident block
    reg_alloc_unit: int = 256  # registers per warp are allocated in these units


TARGETS = {
    "sm_90": TargetLimits("sm_90", 90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
    "sm_80": TargetLimits("sm_80", 80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
}


def blocks_per_sm(limits: TargetLimits, regs: int, num_warps: int, smem: int) -> int:
    """Resident blocks per SM: the least of what registers, shared memory and warps allow."""
    unit = limits.reg_alloc_unit
    regs_per_warp = -(-regs * 32 // unit) * unit
    by_regs = (limits.regs_per_sm // max(regs_per_warp, 1)) // num_warps
    by_warps = limits.max_warps_per_sm // num_warps
    by_smem = limits.smem_per_sm // (smem + limits.reserved_smem_per_block)
    return min(by_regs, by_warps, by_smem, limits.max_blocks_per_sm)


@dataclass
class Variant:
    """One distinct specialisation of one kernel for one target, and the steps that launch it."""

    module: str
    kernel: str
    target: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    unaligned: list[str]  # pointer/integer arguments not known 16-aligned (or not specialised)
    dtype: str = ""  # the activations' (fp16 | bf16), from the step that launched it
    job: tuple = field(repr=False, default=())  # what a worker compiles
    steps: list[str] = field(default_factory=list)
    regs: int = -1
    spill_stores: int = -1  # bytes
    spill_loads: int = -1
    stack_bytes: int = -1
    smem: int = -1  # dynamic (Triton's) + static
    loop_instructions: int = 0  # SASS instructions in the longest loop (the main one), per thread
    blocks_per_sm: int = 0
    compile_s: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        """Why this variant would fail or run badly on the target (empty if none)."""
        limits = TARGETS[self.target]
        if self.error:
            return [f"does not compile: {self.error}"]
        found = []
        if self.spill_stores or self.spill_loads or self.stack_bytes:
            spills = f"{self.spill_stores} B stored, {self.spill_loads} B loaded"
            found.append(f"spills: {spills}, stack frame {self.stack_bytes} B")
        if self.regs > limits.max_regs_per_thread:
            found.append(f"{self.regs} registers > {limits.max_regs_per_thread}")
        if self.smem > limits.smem_per_block:
            found.append(f"{self.smem} B shared memory > {limits.smem_per_block}")
        if self.blocks_per_sm < 1:
            found.append("no block fits on an SM")
        return found


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    return str(value)


def bind(launch: Launch, target: TargetLimits, backend: Any) -> tuple[tuple, Variant]:
    """Specialise a recorded launch as JITFunction.run would; returns (dedupe key, variant)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    assert hasattr(fn, "params"), "a JITFunction is needed to compile: unset TRITON_INTERPRET"
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", fn.debug or knobs.runtime.debug)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    key = (fn.fn.__module__, fn.fn.__name__, target.name, repr(specialization))
    key += (repr(sorted((k, repr(v)) for k, v in options.items())),)
    opts, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    names = [p.name for p in fn.params]
    # Declared constexprs, and integer arguments the binder specialised because they were 1.
    shown = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    unaligned = [
        names[i]
        for i, (kind, attr) in enumerate(specialization)
        if kind != "constexpr" and (kind.startswith("*") or kind[0] in "iu") and attr != "D"
    ]
    variant = Variant(
        module=fn.fn.__module__,
        kernel=fn.fn.__name__,
        target=target.name,
        dtype=launch.step.split()[1] if launch.step else "",
        constexprs=shown,
        num_warps=opts.num_warps,
        num_stages=opts.num_stages,
        unaligned=unaligned,
        job=(
            fn.fn.__module__,
            fn.fn.__name__,
            signature,
            constexprs,
            attrs,
            opts.__dict__,
            target.capability,
        ),
    )
    return key, variant


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


_BRANCH = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+ )?BRA 0x([0-9a-f]+)")


def _loop_instructions(cubin: bytes) -> int:
    """Instructions in the span of the longest backward branch of the SASS (cuobjdump from
    the triton wheel): the main loop's body, each instruction 16 bytes."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        command = [knobs.nvidia.cuobjdump.path, "--dump-sass", f.name]
        sass = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    spans = [int(a, 16) - int(b, 16) for a, b in _BRANCH.findall(sass) if int(b, 16) < int(a, 16)]
    return max(spans, default=0) // 16


def _compile(job: tuple) -> dict[str, Any]:
    """In a worker: compile one variant, return ptxas' figures (or the error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, signature, constexprs, attrs, options, capability = job
    fn = getattr(importlib.import_module(module), name)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(fn, signature, constexprs, attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as e:  # a compile failure is a result to report, not a crash
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
    text = log.getvalue()
    found = {k: [int(v) for v in pattern.findall(text)] for k, pattern in _PTXAS.items()}
    if not found["regs"]:
        return {"error": "no ptxas report (was the compile cached? use a fresh TRITON_CACHE_DIR)"}
    return {
        "loop_instructions": _loop_instructions(kernel.asm["cubin"]),
        "regs": found["regs"][0],
        "spill_stores": sum(found["spill_stores"]),
        "spill_loads": sum(found["spill_loads"]),
        "stack_bytes": sum(found["stack"]),
        "smem": kernel.metadata.shared + sum(found["smem"]),
        "compile_s": time.perf_counter() - start,
    }


def collect(
    models: Iterable[str], dtypes: Iterable[str], targets: Iterable[str], shape: ServingShape
) -> list[Variant]:
    """Record every model's launches, bind them per target, keep each distinct variant once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    variants: dict[tuple, Variant] = {}
    launches = [launch for m in models for d in dtypes for launch in record(m, d, shape)]
    for name in targets:
        limits = TARGETS[name]
        backend = make_backend(GPUTarget("cuda", limits.capability, 32))
        for launch in launches:
            key, variant = bind(launch, limits, backend)
            variants.setdefault(key, variant).steps.append(launch.step)
    return list(variants.values())


def compile_all(variants: list[Variant], jobs: int) -> None:
    """Compile every variant in `jobs` fresh processes; fills in each variant's figures."""
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for variant, result in zip(
            variants, pool.map(_compile, [v.job for v in variants]), strict=True
        ):
            for k, v in result.items():
                setattr(variant, k, v)
            if not variant.error:
                limits = TARGETS[variant.target]
                variant.blocks_per_sm = blocks_per_sm(
                    limits, variant.regs, variant.num_warps, variant.smem
                )


def _describe(v: Variant) -> str:
    skip = {"DOT_PRECISION", "LOOKUP_ASM"}  # the PTX text follows from LOOKUP and the dtype
    return " ".join(f"{k}={_short(val)}" for k, val in v.constexprs.items() if k not in skip)


def _used_by(v: Variant) -> str:
    steps = sorted(set(v.steps))
    kinds = sorted({" ".join(s.split()[2:3]) for s in steps})
    return f"{len(steps)} steps ({', '.join(kinds)}), e.g. {steps[0]}"


def table(variants: list[Variant], markdown: bool) -> list[str]:
    """One line per variant: kernel, its constexprs, warps/stages, registers, spills, smem,
    blocks per SM, unaligned arguments, the steps that launch it."""
    header = ["target", "kernel", "dtype", "variant", "warps", "stages", "regs", "spill st/ld B"]
    header += ["smem B"]
    header += ["blocks/SM", "unaligned args", "launched by"]
    rows = []
    order = lambda v: (v.target, v.kernel, v.dtype, _describe(v), v.unaligned)  # noqa: E731
    for v in sorted(variants, key=order):
        spills = f"{v.spill_stores}/{v.spill_loads}"
        figures = ["-"] * 4 if v.error else [v.regs, spills, v.smem, v.blocks_per_sm]
        row = [v.target, v.kernel.lstrip("_"), v.dtype, _describe(v), v.num_warps, v.num_stages]
        row += [*figures[:4], ",".join(v.unaligned) or "-", v.error or _used_by(v)]
        rows.append([str(c) for c in row])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    return [" | ".join(header), *(" | ".join(r) for r in rows)]


def summary(variants: list[Variant]) -> list[str]:
    """One markdown line per target and kernel: variants, register range, spilling variants,
    largest shared memory, fewest blocks per SM."""
    groups: dict[tuple[str, str], list[Variant]] = {}
    for v in variants:
        groups.setdefault((v.target, v.kernel.lstrip("_")), []).append(v)
    lines = ["| target | kernel | variants | registers | spilling | max smem KiB | min blocks/SM |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for (target, kernel), group in sorted(groups.items()):
        ok = [v for v in group if not v.error]
        regs = f"{min(v.regs for v in ok)}-{max(v.regs for v in ok)}" if ok else "-"
        spilling = sum(1 for v in ok if v.spill_stores or v.spill_loads or v.stack_bytes)
        smem = max((v.smem for v in ok), default=0) / 1024
        fewest = min((v.blocks_per_sm for v in ok), default=0)
        lines.append(
            f"| {target} | {kernel} | {len(group)} | {regs} | {spilling} | {smem:.0f} | {fewest} |"
        )
    return lines


def load(path: Path) -> list[Variant]:
    """The variants of a --json report (older reports: dtype taken from the first step)."""
    known = {f.name for f in fields(Variant)}
    variants = []
    for row in json.loads(path.read_text())["variants"]:
        variant = Variant(**{k: v for k, v in row.items() if k in known and k != "job"})
        variant.dtype = variant.dtype or (variant.steps[0].split()[1] if variant.steps else "")
        variants.append(variant)
    return variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.kernels_compiled",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--max-num-seqs", type=int, default=ServingShape.max_num_seqs)
    p.add_argument(
        "--max-lora-ranks", type=int, nargs="+", default=list(ServingShape.max_lora_ranks)
    )
    p.add_argument("--kernels", nargs="+", help="only kernels whose name contains one of these")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", type=Path, help="also write every variant's figures here")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--summary", action="store_true", help="one line per kernel, not per variant")
    p.add_argument("--from-json", type=Path, help="print a saved --json report, compile nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Compile, print the table and a summary; 1 if any variant has a problem."""
    args = parse_args(argv)
    if args.from_json:
        variants = load(args.from_json)
        print("\n".join(summary(variants) if args.summary else table(variants, args.markdown)))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench.kernels_compiled compiles for a GPU: unset TRITON_INTERPRET")
    shape = ServingShape(max_num_seqs=args.max_num_seqs, max_lora_ranks=tuple(args.max_lora_ranks))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraplex-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh, so every compile reports ptxas' figures
        variants = collect(args.models, args.dtypes, args.targets, shape)
        if args.kernels:
            variants = [v for v in variants if any(k in v.kernel for k in args.kernels)]
        compile_all(variants, max(1, args.jobs))
    elapsed = time.perf_counter() - start
    print("\n".join(summary(variants) if args.summary else table(variants, args.markdown)))
    bad = [(v, p) for v in variants for p in v.problems()]
    for v, problem in bad:
        print(f"PROBLEM {v.target} {v.kernel} {_describe(v)}: {problem}", file=sys.stderr)
    print(
        f"# {len(variants)} variants over {', '.join(args.targets)}: {len(bad)} problems; "
        f"{elapsed:.0f} s with {args.jobs} processes"
    )
    if args.json:
        rows = [asdict(v) | {"job": None, "problems": v.problems()} for v in variants]
        args.json.write_text(
            json.dumps({"elapsed_s": elapsed, "variants": rows}, default=repr, indent=1)
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
