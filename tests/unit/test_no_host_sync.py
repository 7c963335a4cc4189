"""The forward pass never waits for the device: every operation that would copy a device value
to the host (and so block on a GPU) raises while the model runs, and steps still complete.

On CPU nothing actually blocks, so the guard patches the Tensor methods that sync on CUDA:
.item(), .tolist(), .cpu(), .numpy(), bool()/int()/float() of a tensor, nonzero, and indexing
with a boolean mask. On a GPU, tests/gpu/ runs a step under torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from server.engine.model_runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import save_peft_adapter


class HostSyncError(AssertionError):
    """A device-to-host sync inside the forward pass."""


_SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


def _called_by_triton_interpreter() -> bool:
    """True inside Triton's CPU interpreter, whose own conversions of kernel arguments to
    numpy stand in for a GPU launch; the launchers and the code around them stay guarded."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("triton."):
            return True
        frame = frame.f_back
    return False


def _has_bool_mask(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make the syncing Tensor methods raise while the block runs."""
    saved = {name: getattr(torch.Tensor, name) for name in (*_SYNCING, "__getitem__")}

    def refuse(name: str):  # type: ignore[no-untyped-def]
        def method(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if _called_by_triton_interpreter():
                return saved[name](self, *args, **kwargs)
            raise HostSyncError(f"Tensor.{name} syncs with the host inside the forward pass")

        return method

    def getitem(self, index):  # type: ignore[no-untyped-def]
        if _has_bool_mask(index) and not _called_by_triton_interpreter():
            raise HostSyncError("boolean-mask indexing syncs with the host")
        return saved["__getitem__"](self, index)

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, refuse(name))
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign]
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.fixture
def guarded_forward(monkeypatch) -> list[int]:
    """Run every ModelRunner forward under the guard; counts the guarded steps."""
    steps: list[int] = []
    run = ModelRunner.run

    def guarded(self, step):  # type: ignore[no-untyped-def]
        with forbid_host_sync():
            logits = run(self, step)
        steps.append(step.input_ids.shape[0])
        return logits

    monkeypatch.setattr(ModelRunner, "run", guarded)
    return steps


def test_the_guard_catches_each_kind_of_sync():
    t = torch.tensor([1.0, 2.0])
    for attempt in (
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: t.cpu(),
        lambda: bool(t[0]),
        lambda: t[t > 1],
        lambda: t.nonzero(),
    ):
        with forbid_host_sync(), pytest.raises(HostSyncError):
            attempt()
    assert t.tolist() == [1.0, 2.0]  # restored afterwards


def test_base_model_steps_mixing_prefill_and_decode_never_sync(
    tiny_model_dir, make_engine, guarded_forward
):
    # A small token budget splits prompts into chunks that share steps with decodes.
    engine = make_engine(tiny_model_dir("llama"), max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [list(range(1, 30)), [1, 5, 9], list(range(40, 52))]

    outs = engine.generate(prompts, params)

    assert all(len(o.token_ids) == 4 for o in outs)
    assert len(guarded_forward) >= 5 and max(guarded_forward) > len(prompts)


def test_steps_with_adapters_norms_embeddings_and_rope_factors_never_sync(
    tiny_model_dir, make_engine, guarded_forward, tmp_path
):
    base = tiny_model_dir("llama")
    adapters = {
        "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "norms-embed": dict(
            r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["norm", "embed_tokens"]
        ),
        "rope": dict(r=4, lora_alpha=8, target_modules=["v_proj"], rope_scaling_factor=2.0),
    }
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    for i, (name, kwargs) in enumerate(adapters.items()):
        registry.register_dir(name, save_peft_adapter(base, tmp_path / name, seed=i, **kwargs))
    engine = make_engine(base, registry=registry, max_num_batched_tokens=24)
    names = [None, *adapters]
    prompts = [list(range(3 + i, 20 + 2 * i)) for i in range(len(names))]
    params = SamplingParams(max_tokens=3, temperature=0.7, seed=3, ignore_eos=True)

    outs = engine.generate(prompts, params, names)

    assert all(len(o.token_ids) == 3 for o in outs)
    assert len(guarded_forward) >= 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_backend_steps_with_adapters_never_sync(
    backend, tiny_model_dir, make_engine, guarded_forward, tmp_path
):
    """The Triton kernels (NF4 matmul, paged attention, SGMV LoRA) run in the interpreter on
    CPU; the launchers around them are held to the same rule."""
    if backend == "triton":
        pytest.importorskip("triton")
        from tests.kernel_cases import kernel_device

        if kernel_device() is None:
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    base = tiny_model_dir("llama")
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    registry.register_dir("a", save_peft_adapter(base, tmp_path / "a", seed=1, **lora))
    engine = make_engine(
        base,
        registry=registry,
        quantize="nf4",
        kernel_backend=backend,
        lora_backend=backend,
        max_num_batched_tokens=16,
    )
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    outs = engine.generate([list(range(3, 25)), [1, 5, 9]], params, ["a", None])

    assert all(len(o.token_ids) == 3 for o in outs)
    assert len(guarded_forward) >= 3
