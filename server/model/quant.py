"""4-bit NF4 quantization (bitsandbytes) as a module swap on a built model."""

from __future__ import annotations

import logging

import torch
from torch import nn

from server.model.config import PACKED_LINEARS, ModelConfig

logger = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64


def import_bitsandbytes():  # type: ignore[no-untyped-def]
    """bitsandbytes, with its import-time chatter about optional CPU kernels kept out of logs."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear4bit (NF4, double quantization) holding `linear`'s weights."""
    bnb = import_bitsandbytes()
    q = _empty_linear4bit(linear, compute_dtype, nested=True)
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu", compute_dtype),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        blocksize=NF4_BLOCKSIZE,
    )
    return q.to(device)  # moving a Params4bit quantizes it


def _empty_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, nested: bool) -> nn.Module:
    """A Linear4bit shaped like `linear`, with its bias; the caller sets the weight."""
    bnb = import_bitsandbytes()
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=nested,
        quant_type="nf4",
        device="cpu",
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q


def nf4_packed_linear(
    linear: nn.Linear, widths: tuple[int, ...], compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A Linear4bit holding a packed linear (q/k/v, gate/up) exactly as bitsandbytes quantizes
    each checkpoint module alone, as transformers + PEFT do when training a QLoRA adapter.

    Double quantization's statistics depend on the whole tensor (the nested offset is the mean
    of all its absmaxes), so quantizing the packed matrix at once gives other weights than
    quantizing q, k and v apart. Each slice is quantized on its own instead, and its absmaxes
    kept as the float32 values its nested statistics decode to: the same weights, bit for bit,
    at 0.375 more bits per weight than nested storage.
    """
    bnb = import_bitsandbytes()
    weight = linear.weight.data.to("cpu", compute_dtype)  # weight: [sum(widths), in]
    if any(w * weight.shape[1] % NF4_BLOCKSIZE for w in widths):
        return nf4_linear(linear, compute_dtype, device)  # a block would straddle two slices
    packed, absmax = [], []
    state = None
    for part in weight.split(list(widths), dim=0):
        data, state = bnb.functional.quantize_4bit(
            part.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
        packed.append(data.flatten())
        nested = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
        absmax.append((nested + state.offset).float())
    assert state is not None
    quant_state = bnb.functional.QuantState(
        absmax=torch.cat(absmax),
        shape=weight.shape,
        code=state.code,
        blocksize=NF4_BLOCKSIZE,
        quant_type="nf4",
        dtype=compute_dtype,
    )
    q = _empty_linear4bit(linear, compute_dtype, nested=False)
    q.weight = bnb.nn.Params4bit(
        torch.cat(packed).unsqueeze(1),
        requires_grad=False,
        quant_state=quant_state,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        module=q,
        bnb_quantized=True,
    )
    return q.to(device)


def quantize_nf4(
    model: nn.Module,
    compute_dtype: torch.dtype,
    device: torch.device,
    skip: tuple[str, ...] = ("lm_head",),
) -> int:
    """Swap every nn.Linear except `skip` for an NF4 Linear4bit, in place; returns the count.
    Packed linears are quantized slice by slice (see nf4_packed_linear)."""
    config = getattr(model, "config", None)
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or full in skip:
                continue
            if isinstance(config, ModelConfig) and len(PACKED_LINEARS.get(child_name, ())) > 1:
                widths = config.packed_slices(child_name).widths
                swapped_in = nf4_packed_linear(child, widths, compute_dtype, device)
            else:
                swapped_in = nf4_linear(child, compute_dtype, device)
            setattr(parent, child_name, swapped_in)
            swapped += 1
    logger.debug("quantized %d linears to NF4", swapped)
    return swapped


def is_nf4(module: nn.Module) -> bool:
    bnb = import_bitsandbytes()
    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A float nn.Linear with the weights bitsandbytes reconstructs from an NF4 module."""
    bnb = import_bitsandbytes()
    weight = module.weight
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    out.weight = nn.Parameter(dense.to(module.compute_dtype), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
    return out.to(dense.device)
