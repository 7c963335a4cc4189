"""The implementations a step runs on, chosen once at start-up from --kernel-backend and
--lora-backend: the torch path (the CPU's, and the reference the kernels are tested against)
or Triton's kernels (on CUDA, or in Triton's interpreter when forced on CPU).

A KernelBackend runs the base model's NF4 matmuls and paged attention (a module swap and a
kernel bound to each attention layer: the model stays plain), and says which attention layout
the model runner must build; LoRAOps (server/lora/backends.py) runs the batched LoRA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from server.config import EngineConfig
from server.lora.backends import LORA_OPS
from server.lora.batch import LoRAOps
from server.model.llama import LlamaForCausalLM
from server.model.prepacked import prepack_linears

logger = logging.getLogger(__name__)


class KernelBackend(Protocol):
    """The base model's NF4 matmul and paged attention."""

    name: str
    # Attention follows block tables in place (a SeqLayout per step), rather than SDPA over
    # padded groups of gathered blocks; the layout a decode CUDA graph can replay.
    reads_block_tables: bool

    def adapt(self, model: LlamaForCausalLM) -> None:
        """Bind the backend's kernels into a built (and quantized) model, in place."""
        ...


class TorchKernels:
    """bitsandbytes' NF4 matmul, PyTorch's SDPA, and on a CPU oneDNN's GEMM over prepacked
    float weights (server/model/prepacked.py) and our C decode attention reading the KV pages
    in place (server/kernels/cpu_kernels.py), where it compiles."""

    name = "torch"
    reads_block_tables = False

    def adapt(self, model: LlamaForCausalLM) -> None:
        prepack_linears(model)  # swaps nothing on a GPU or for NF4 modules
        embed = model.model.embed_tokens.weight
        if embed.device.type != "cpu":
            return
        from server.kernels import cpu_kernels

        if not cpu_kernels.supports_attention(embed.dtype):
            return
        kernels = cpu_kernels.load()
        if kernels is not None:
            for attn in model.attention_layers():
                attn.decode_kernel = kernels.decode_attention


class TritonKernels:
    """Our NF4 matmul over bitsandbytes' storage and paged attention (server/kernels)."""

    name = "triton"
    reads_block_tables = True

    def adapt(self, model: LlamaForCausalLM) -> None:
        from server.kernels.nf4_linear import use_nf4_kernel
        from server.kernels.paged_attention import paged_attention_layer

        use_nf4_kernel(model)  # bitsandbytes quantized it; our kernel multiplies
        for attn in model.attention_layers():
            attn.paged_kernel = paged_attention_layer


KERNELS: dict[str, KernelBackend] = {"torch": TorchKernels(), "triton": TritonKernels()}


@dataclass(frozen=True)
class Backends:
    """What the engine runs on, for its whole life."""

    kernels: KernelBackend
    lora: LoRAOps

    def decode_graphs(self, with_adapters: bool) -> bool:
        """Whether decode steps can be captured as CUDA graphs: what they run must read the
        step's layout from device tables alone."""
        return self.kernels.reads_block_tables and (self.lora.graph_safe or not with_adapters)

    @classmethod
    def choose(cls, config: EngineConfig) -> Backends:
        """Each `auto` is Triton on CUDA when Triton is installed, the torch path otherwise."""
        kernels = _resolve(config, config.kernel_backend, "NF4 matmul and paged attention")
        lora = _resolve(config, config.lora_backend, "batched LoRA")
        return cls(KERNELS[kernels], LORA_OPS[lora])


def _resolve(config: EngineConfig, choice: str, feature: str) -> str:
    if choice != "auto":
        return choice
    if config.torch_device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning("Triton is not installed; %s falls back to the torch path", feature)
        return "torch"
    return "triton"
