"""Enough of PTX to run the kernels' inline assembly in Triton's CPU interpreter (test-only).

Triton's interpreter refuses `tl.inline_asm_elementwise`. `emulate_inline_asm` stands in for
the interpreter builder's `create_inline_asm`: it packs the operands as the GPU backend does
(elements narrower than 32 bits, `pack` to an instance, packed into 32-bit registers, the first
element in the lowest bits), runs the PTX text instruction by instruction over numpy uint32
arrays (one lane per instance), and unpacks the outputs. Only the instructions the kernels use
are known (mov, and, or, add, shr, shl, prmt in its default mode, mul.rn.f16x2,
fma.rn.bf16x2); anything else raises, so an emulated kernel never runs an instruction nobody
wrote semantics for here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

_MASK = np.uint64(0xFFFFFFFF)


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte c[4i+2:4i] of {b, a}, or that
    byte's sign replicated when bit 4i+3 of c is set."""
    source = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a, dtype=np.uint64)
    for i in range(4):
        selector = (c.astype(np.uint64) >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (source >> ((selector & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        sign = np.where((byte & np.uint64(0x80)) != 0, np.uint64(0xFF), np.uint64(0))
        byte = np.where((selector & np.uint64(8)) != 0, sign, byte)
        out |= byte << np.uint64(8 * i)
    return (out & _MASK).astype(np.uint32)


def _halves(a: np.ndarray) -> np.ndarray:
    return np.stack([a & np.uint32(0xFFFF), a >> np.uint32(16)], axis=-1).astype(np.uint16)


def _join(halves: np.ndarray) -> np.ndarray:
    return halves[..., 0].astype(np.uint32) | (halves[..., 1].astype(np.uint32) << np.uint32(16))


def _mul_f16x2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mul.rn.f16x2: the fp32 product of two fp16 values is exact, so one rounding to fp16
    is the correctly rounded product."""
    x, y = _halves(a).view(np.float16), _halves(b).view(np.float16)
    product = (x.astype(np.float32) * y.astype(np.float32)).astype(np.float16)
    return _join(product.view(np.uint16))


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (no NaN here: products of finite table values and scales)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _fma_bf16x2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fma.rn.bf16x2: a * b + c, one rounding; the product of two bf16 values is exact in
    fp32, and so is its sum with c = -0.0 (the only addend the kernels use)."""
    x, y, z = (_bf16_to_f32(_halves(v)) for v in (a, b, c))
    assert np.all(z == 0), "the emulated fma only adds zeros"
    return _join(_f32_to_bf16(x * y + z))


_OPS: dict[str, Callable[..., np.ndarray]] = {
    "mov.b32": lambda a: a,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "add.u32": lambda a, b: (a.astype(np.uint64) + b) & _MASK,
    "shr.b32": lambda a, b: (a >> (b & np.uint32(31))) * (b < 32),
    "shl.b32": lambda a, b: (a << (b & np.uint32(31))) * (b < 32),
    "prmt.b32": _prmt,
    "mul.rn.f16x2": _mul_f16x2,
    "fma.rn.bf16x2": _fma_bf16x2,
}


def run_ptx(asm: str, operands: list[np.ndarray], num_outputs: int) -> list[np.ndarray]:
    """Run `asm` with $0..$(num_outputs - 1) as outputs and the rest from `operands` (uint32
    arrays, one entry per lane); returns the output registers."""
    lanes = operands[0].shape
    regs: dict[str, np.ndarray] = {f"${num_outputs + i}": op for i, op in enumerate(operands)}
    text = re.sub(r"//[^\n]*", "", asm).replace("{", ";").replace("}", ";")
    for statement in filter(None, (s.strip() for s in text.split(";"))):
        if statement.startswith(".reg"):
            continue
        opcode, _, rest = statement.partition(" ")
        if opcode not in _OPS:
            raise NotImplementedError(f"the PTX emulator does not know {opcode!r}")
        dest, *sources = (arg.strip() for arg in rest.split(","))

        def value(arg: str) -> np.ndarray:
            if arg in regs:
                return regs[arg]
            return np.full(lanes, int(arg, 0) & 0xFFFFFFFF, dtype=np.uint32)

        regs[dest] = _OPS[opcode](*(value(a) for a in sources)).astype(np.uint32)
    return [regs[f"${i}"] for i in range(num_outputs)]


class _Results(list):
    def get_result(self, i: int):  # type: ignore[no-untyped-def]
        return self[i]


def emulate_inline_asm(self, asm, constraints, values, types, is_pure, pack):  # type: ignore[no-untyped-def]
    """InterpreterBuilder.create_inline_asm, for the register-only asm the kernels use."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle, _get_np_dtype

    kinds = [c.strip() for c in constraints.split(",")]
    assert all(k in ("=r", "r") for k in kinds), f"only 32-bit registers: {constraints}"
    shape = np.broadcast_shapes(*(v.data.shape for v in values))
    operands = []
    for v in values:
        flat = np.ascontiguousarray(np.broadcast_to(v.data, shape)).reshape(-1)
        bits = flat.dtype.itemsize * 8
        assert bits <= 32 and (pack * bits) % 32 == 0, f"cannot pack {flat.dtype} by {pack}"
        regs = flat.view(np.uint8).view(np.uint32).reshape(-1, pack * bits // 32)
        operands += [regs[:, j] for j in range(regs.shape[1])]
    outputs, results = [], _Results()
    for ty in types:
        elem = ty.element_ty if isinstance(ty, tl.block_type) else ty
        outputs.append((elem, pack * elem.primitive_bitwidth // 32))
    assert kinds.count("=r") == sum(n for _, n in outputs), "outputs do not match constraints"
    regs = run_ptx(asm, operands, sum(n for _, n in outputs))
    for elem, num_regs in outputs:
        lanes = np.stack(regs[:num_regs], axis=1)
        regs = regs[num_regs:]
        data = lanes.reshape(-1).view(_get_np_dtype(elem)).reshape(shape)
        results.append(TensorHandle(data, elem))
    return results
