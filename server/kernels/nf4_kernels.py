"""Triton kernels of the NF4 matmul: dequantize packed NF4 tiles in registers, multiply.

The launchers are in server.kernels.nf4_matmul. A weight tile arrives as packed bytes (two
4-bit codes each, high nibble first: even and odd columns) loaded as 16-byte vectors, plus one
absmax per block of 64 values (a uint8 code into `code2` times a per-256-blocks float and an
offset, with double quantization). The 16-entry NF4 table is looked up in registers, one of two
ways (LOOKUP):

- "prmt" (CUDA, 16-bit activations): inline PTX. The table, 16 values in the activations'
  dtype, is split into a high-byte and a low-byte plane of 16 bytes each (four 32-bit words
  per plane: two as immediates, two loaded once per program, since a prmt's first source must
  be a register); `prmt` picks 4 bytes out of 8 at once, so each plane answers four 3-bit
  lookups in two `prmt`s, a third picks per byte by the code's top bit, two more interleave the
  planes into (high nibble, low nibble) pairs, and one paired multiply per pair applies the
  block's scale: about 30 instructions per 8 values, no memory access per value. The table and
  the scale are rounded to 16 bits before the product where bitsandbytes rounds only the
  product: the weights can differ from its dequantize by about a unit in the last place.
- "select" (fp32, and Triton's interpreter, which has no inline assembly): a tree of 15
  selects on the code's bits over the exact fp32 table, times the scale in fp32, rounded to
  the activations' dtype as bitsandbytes' dequantize then matmul rounds. Exact, but about 20
  instructions per value.

Each byte's two weights come out side by side, so the tile is in column order for the dot
with x tiles loaded contiguously.
"""

import triton
import triton.language as tl

# bitsandbytes' NF4 table (create_normal_map), in code order.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _planes(table_bits: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """The table's high-byte and low-byte planes: 4 words each, word i holding entries
    4i..4i+3's byte (entry 4i in the lowest byte)."""
    assert len(table_bits) == 16 and all(0 <= b < 1 << 16 for b in table_bits)
    return tuple(  # type: ignore[return-value]
        [
            sum(((table_bits[4 * i + j] >> shift) & 0xFF) << (8 * j) for j in range(4))
            for i in range(4)
        ]
        for shift in (8, 0)
    )


def prmt_lookup_words(table_bits: tuple[int, ...]) -> list[int]:
    """The plane words the PTX takes in registers (words 0 and 2 of each plane): what the
    kernel loads once per program and passes as $7, $11, $15, $19 (int32 bit patterns)."""
    hi, lo = _planes(table_bits)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in (hi[0], hi[2], lo[0], lo[2])]


def prmt_lookup_asm(table_bits: tuple[int, ...], bf16: bool) -> str:
    """PTX for pack=4 over packed bytes: $4 holds 4 of them, $5..$8 each byte's scale (a
    16-bit pair, the same value twice), $9, $13, $17, $21 the plane words of
    prmt_lookup_words (operands of 4 registers each, all equal). $0..$3 get, per byte, its
    high nibble's value (low half) and its low nibble's value (high half) times the scale:
    the two columns of the byte, in order.

    Plane words 0 and 2 come in registers rather than as immediates: a prmt's first source
    must be a register, and ptxas would keep immediates in uniform registers, copied back
    before every use (about a third of the loop's instructions)."""
    hi, lo = _planes(table_bits)
    lines = ["{", ".reg .b32 s, t, a, b, h<2>, l<2>;"]
    for half, (shift_s, shift_t) in enumerate(((0, 1), (16, 17))):
        # s: entry & 7 of the 4 nibbles of two bytes; t: take the upper 8 entries' byte
        # where the nibble's top bit is set (an add, not an or: one immediate per instruction).
        lines += [
            f"shr.b32 s, $4, {shift_s};",
            "and.b32 s, s, 0x7777;",
            f"shr.b32 t, $4, {shift_t};",
            "and.b32 t, t, 0x4444;",
            "add.u32 t, t, 0x3210;",
        ]
        for name, words, (first, third) in (
            (f"h{half}", hi, ("$9", "$13")),
            (f"l{half}", lo, ("$17", "$21")),
        ):
            lines += [
                f"prmt.b32 a, {first}, {hex(words[1])}, s;",
                f"prmt.b32 b, {third}, {hex(words[3])}, s;",
                f"prmt.b32 {name}, a, b, t;",
            ]
        # Nibbles sit low, high, low, high; a byte's high nibble is its even column.
        lines += [
            f"prmt.b32 ${2 * half}, l{half}, h{half}, 0x4051;",
            f"prmt.b32 ${2 * half + 1}, l{half}, h{half}, 0x6273;",
        ]
    if bf16:  # sm_80 has no bf16x2 mul; an fma adding -0.0 is the exact product
        lines.append("mov.b32 a, 0x80008000;")
    for out in range(4):  # times the scales, two values per instruction
        if bf16:
            lines.append(f"fma.rn.bf16x2 ${out}, ${out}, ${5 + out}, a;")
        else:
            lines.append(f"mul.rn.f16x2 ${out}, ${out}, ${5 + out};")
    return "\n".join([*lines, "}"])


@triton.jit
def _select_nf4(code):
    """NF4 value of each 4-bit code (int32 in [0, 16)), exact fp32, by a tree of selects."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    v0 = tl.where(b0, -0.6961928009986877, -1.0)
    v1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    v2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    v3 = tl.where(b0, 0.0, -0.09105003625154495)
    v4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    v5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    v6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    v7 = tl.where(b0, 1.0, 0.7229568362236023)
    low = tl.where(b2, tl.where(b1, v3, v2), tl.where(b1, v1, v0))
    high = tl.where(b2, tl.where(b1, v7, v6), tl.where(b1, v5, v4))
    return tl.where((code & 8) != 0, high, low)


@triton.jit
def _lookup_scaled(
    packed,
    scale,
    words,
    OUT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    LOOKUP: tl.constexpr,
    LOOKUP_ASM: tl.constexpr,
):
    """packed: [R, C] uint8, scale: [R, NB] float32 (one per block of BLOCKSIZE values) -> the
    [R, 2C] weights in OUT_DTYPE, columns in order (a byte's high nibble first).
    words: the "prmt" table's register words."""
    R: tl.constexpr = packed.shape[0]
    C: tl.constexpr = packed.shape[1]
    NB: tl.constexpr = 2 * C // BLOCKSIZE
    if LOOKUP == "prmt":
        # Each byte's scale as a 16-bit pair (s, s), built on the small per-block tile.
        bits = scale.to(OUT_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)
        pair = tl.broadcast_to((bits | (bits << 16))[:, :, None], (R, NB, BLOCKSIZE // 2))
        pairs = tl.inline_asm_elementwise(
            LOOKUP_ASM,
            # 4 outputs; inputs: 4 bytes, 4 scale pairs, 4 x 4 table words (one per element)
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [packed, tl.reshape(pair, (R, C)), words[0], words[1], words[2], words[3]],
            dtype=tl.uint32,
            is_pure=True,
            pack=4,
        )
        hi = (pairs & 0xFFFF).to(tl.uint16).to(OUT_DTYPE, bitcast=True)
        lo = (pairs >> 16).to(tl.uint16).to(OUT_DTYPE, bitcast=True)
    else:
        # Rounded to the activations' dtype after the fp32 product, as bitsandbytes rounds.
        codes = packed.to(tl.int32)
        full = tl.reshape(tl.broadcast_to(scale[:, :, None], (R, NB, BLOCKSIZE // 2)), (R, C))
        hi = (_select_nf4(codes >> 4) * full).to(OUT_DTYPE)
        lo = (_select_nf4(codes & 0xF) * full).to(OUT_DTYPE)
    return tl.reshape(tl.join(hi, lo), (R, 2 * C))


@triton.jit
def _lookup_words(words_ptr, LOOKUP: tl.constexpr):
    """The "prmt" table's register words, loaded once per program (none for "select")."""
    if LOOKUP == "prmt":
        words = (
            tl.load(words_ptr),
            tl.load(words_ptr + 1),
            tl.load(words_ptr + 2),
            tl.load(words_ptr + 3),
        )
    else:
        words = (0, 0, 0, 0)
    return words


@triton.jit
def _block_scales(
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    rows,  # [BLOCK_N] int64 weight rows
    k0,
    blocks_per_row,
    n_mask,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The absmax of each block of the [BLOCK_N, BLOCK_K] tile at column k0, loaded once per
    block (not per value): [BLOCK_N, BLOCK_K // BLOCKSIZE] float32."""
    blocks = rows[:, None] * blocks_per_row + (k0 // BLOCKSIZE + tl.arange(0, BLOCK_K // BLOCKSIZE))
    if NESTED:
        q = tl.load(absmax_ptr + blocks, mask=n_mask[:, None], other=0).to(tl.int32)
        group = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=n_mask[:, None], other=0.0)
        scale = tl.load(code2_ptr + q) * group + offset
    else:
        scale = tl.load(absmax_ptr + blocks, mask=n_mask[:, None], other=0.0)
    return scale


@triton.jit
def _dequantize_tile(
    w_rows,  # [BLOCK_N, 1] pointers to the packed rows
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    words,  # the "prmt" table's register words (_lookup_words)
    offset,
    rows,
    k0,
    blocks_per_row,
    n_mask,
    OUT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOKUP: tl.constexpr,
    LOOKUP_ASM: tl.constexpr,
):
    """The weight tile at column k0: [BLOCK_N, BLOCK_K] in OUT_DTYPE, columns in order."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_b = tl.max_contiguous(tl.multiple_of(tl.arange(0, HALF_K), HALF_K), HALF_K)
    packed = tl.load(w_rows + (k0 // 2 + offs_b)[None, :], mask=n_mask[:, None], other=0)
    scale = _block_scales(
        absmax_ptr, absmax2_ptr, code2_ptr, offset, rows, k0, blocks_per_row, n_mask,
        BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_K,
    )  # fmt: skip
    return _lookup_scaled(packed, scale, words, OUT_DTYPE, BLOCKSIZE, LOOKUP, LOOKUP_ASM)


@triton.jit(do_not_specialize=("M", "N", "row_start"))
def nf4_matmul_kernel(
    x_ptr,  # x: [M, K]
    w_ptr,  # packed: [N_all * K // 2] uint8
    absmax_ptr,  # [N_all * K // BLOCKSIZE] uint8 (NESTED) or float32
    absmax2_ptr,  # [*] float32 (NESTED)
    code2_ptr,  # [256] float32 (NESTED)
    words_ptr,  # [4] int32: the "prmt" table's register words
    bias_ptr,  # [N_all] (HAS_BIAS)
    y_ptr,  # y: [M, N] in x's dtype
    M,
    N,
    K_HALF,  # K // 2: bytes per packed row
    row_start,
    offset,
    stride_xm,
    stride_ym,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOKUP: tl.constexpr,
    LOOKUP_ASM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over all of K, bias added, stored in x's dtype.

    Semantics: y = x @ W[row_start:row_start + N].T (+ bias[row_start:row_start + N]), where
    W.view(-1, BLOCKSIZE)[b] = code[nibbles of block b] * absmax[b], and with NESTED
    absmax[b] = code2[absmax_u8[b]] * absmax2[b // BLOCKSIZE2] + offset.
    Grid: (N tiles, M tiles). K is a multiple of BLOCK_K (the launcher picks it so). The
    loop's loads are software-pipelined by Triton (num_stages): the next tiles' packed bytes,
    scales and x are in flight while this tile is dequantized and multiplied.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = (row_start + offs_n).to(tl.int64)  # weight rows; N * K can exceed 2**31
    w_rows = w_ptr + rows[:, None] * K_HALF
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    blocks_per_row = 2 * K_HALF // BLOCKSIZE
    words = _lookup_words(words_ptr, LOOKUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, 2 * K_HALF, BLOCK_K):
        w = _dequantize_tile(
            w_rows, absmax_ptr, absmax2_ptr, code2_ptr, words, offset, rows, k0, blocks_per_row,
            n_mask, x_ptr.dtype.element_ty, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K,
            LOOKUP, LOOKUP_ASM,
        )  # fmt: skip
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=("N", "row_start"))
def nf4_dequantize_kernel(
    w_ptr,  # packed: [N_all * K // 2] uint8
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    words_ptr,
    out_ptr,  # out: [N, K] in the activations' dtype, rows contiguous
    N,
    K_HALF,
    row_start,
    offset,
    stride_on,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOKUP: tl.constexpr,
    LOOKUP_ASM: tl.constexpr,
):
    """out = W[row_start:row_start + N] dequantized (what the matmul kernel multiplies), for
    large M: dequantized once, then multiplied by a library GEMM. Grid: (N tiles, K tiles)."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    n_mask = offs_n < N
    rows = (row_start + offs_n).to(tl.int64)
    words = _lookup_words(words_ptr, LOOKUP)
    w = _dequantize_tile(
        w_ptr + rows[:, None] * K_HALF, absmax_ptr, absmax2_ptr, code2_ptr, words, offset, rows, k0,
        2 * K_HALF // BLOCKSIZE, n_mask, out_ptr.dtype.element_ty, BLOCKSIZE, BLOCKSIZE2,
        NESTED, BLOCK_N, BLOCK_K, LOOKUP, LOOKUP_ASM,
    )  # fmt: skip
    out_ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + (k0 + offs_k)[None, :]
    tl.store(out_ptrs, w, mask=n_mask[:, None])
