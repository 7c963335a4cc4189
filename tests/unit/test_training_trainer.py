"""The trainer on a tiny model: QLoRA and LongLoRA runs, checkpoints, cancel, export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.base import BaseModelInfo
from adapters.format import read_adapter
from server.model.loader import load_model
from server.model.quant import is_nf4, quantize_nf4
from server.training.checkpoint import list_checkpoints
from server.training.events import TrainingEvent
from server.training.hparams import hparams_for
from server.training.trainer import Trainer

SENTENCE = "the quick brown fox jumps over a lazy dog and returns sorted list items"
WORDS = SENTENCE.split()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for _ in range(24):
        words = rng.choices(WORDS, k=5)
        lines.append(
            {"prompt": " ".join(words) + " ->", "completion": " " + " ".join(sorted(words))}
        )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("long") / "train.jsonl"
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(30, 60))) for _ in range(12)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _hp(method: str = "qlora", **overrides):  # type: ignore[no-untyped-def]
    settings = dict(
        r=4,
        learning_rate=5e-3,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=6,
        warmup_steps=1,
        checkpoint_steps=0,
        validation_fraction=0.2,
    )
    return hparams_for(method, {**settings, **overrides})


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, with NF4 weights as their packed bytes plus quant state."""
    snap = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if is_nf4(module):
            snap[f"param:{name}.weight"] = module.weight.data.clone()
            for key, value in module.weight.quant_state.as_dict(packed=True).items():
                snap[f"quant:{name}.{key}"] = value.clone()
    return snap


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _hidden(model, ids, scale=None):  # type: ignore[no-untyped-def]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    rope = None if scale is None else torch.full(ids.shape, scale)
    with torch.no_grad():
        return model(ids, positions, rope)


def test_first_forward_of_qlora_equals_the_nf4_base(model_dir, data, tmp_path):
    trainer = Trainer(model_dir, tmp_path, data, _hp())
    trainer.setup()
    base = load_model(model_dir, torch.float32)
    quantize_nf4(base, torch.float32, torch.device("cpu"))
    for module in base.modules():
        if is_nf4(module):
            module.support_avx512bf16_for_cpu = False  # the same kernel as the trainer's
    ids = torch.randint(3, 300, (2, 16))
    assert torch.equal(_hidden(trainer.eval_model(), ids), _hidden(base.eval(), ids))


def test_qlora_lowers_loss_and_changes_only_lora_weights(model_dir, data, tmp_path):
    events: list[TrainingEvent] = []
    trainer = Trainer(model_dir, tmp_path, data, _hp(), on_event=events.append)
    trainer.setup()
    before = _snapshot(trainer.model)
    result = trainer.train()
    changed = _changed(before, _snapshot(trainer.model))
    assert changed and all(".lora_a." in k or ".lora_b." in k for k in changed)
    assert not any(k.startswith("quant:") for k in changed)  # 4-bit bytes identical
    assert result.status == "succeeded" and result.step == 6
    assert result.valid_loss < result.initial_valid_loss - 0.3
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 7))
    assert steps[-1].loss < steps[0].loss
    assert all(e.learning_rate == 5e-3 and e.tokens_per_second > 0 for e in steps)


def test_learning_rate_warms_up_then_stays_constant(model_dir, data, tmp_path):
    events: list[TrainingEvent] = []
    hp = _hp(max_steps=5, warmup_steps=3, learning_rate=1e-3)
    Trainer(model_dir, tmp_path, data, hp, on_event=events.append).train()
    rates = [e.learning_rate for e in events if e.kind == "step"]
    assert rates == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])


def test_longlora_trains_norms_and_embeddings_and_exports_them(model_dir, long_data, tmp_path):
    hp = _hp("longlora", learning_rate=1e-2, batch_size=2, max_steps=4)
    trainer = Trainer(model_dir, tmp_path, long_data, hp)
    trainer.setup()
    before = _snapshot(trainer.model)
    result = trainer.train()
    changed = _changed(before, _snapshot(trainer.model))
    assert "param:model.embed_tokens.weight" in changed
    assert "param:model.norm.weight" in changed
    assert "param:model.layers.1.post_attention_layernorm.weight" in changed
    assert not any(k.startswith("quant:") or "lm_head" in k for k in changed)
    assert not any("gate_up_proj" in k or "down_proj" in k for k in changed)
    assert result.rope_scaling_factor == 2.0 and trainer.pad_multiple == 8

    base = BaseModelInfo.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    spec, weights = read_adapter(result.adapter_dir, base, max_lora_rank=64)
    assert spec.rope_scaling_factor == 2.0
    assert spec.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert len(spec.saved_modules) == 6
    embed = trainer.model.model.embed_tokens.weight
    assert torch.equal(weights.saved["model.embed_tokens"], embed.detach())


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(model_dir, data, tmp_path):
    hp = _hp(max_steps=4, checkpoint_steps=2, lora_dropout=0.1)  # dropout: RNG must resume too
    full: list[TrainingEvent] = []
    Trainer(model_dir, tmp_path / "full", data, hp, on_event=full.append).train()

    first: list[TrainingEvent] = []
    stop = lambda: any(e.kind == "checkpoint" for e in first)  # noqa: E731
    interrupted = Trainer(
        model_dir, tmp_path / "resumed", data, hp, on_event=first.append, should_stop=stop
    )
    assert interrupted.train().status == "cancelled"
    rest: list[TrainingEvent] = []
    result = Trainer(model_dir, tmp_path / "resumed", data, hp, on_event=rest.append).train()

    assert result.status == "succeeded" and rest[0].message.endswith("step 2")
    losses = [e.loss for e in full if e.kind == "step"]
    assert [e.loss for e in first + rest if e.kind == "step"] == losses
    got = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoints_record_losses_and_only_the_newest_are_kept(model_dir, data, tmp_path):
    hp = _hp(max_steps=6, checkpoint_steps=2, keep_checkpoints=2)
    trainer = Trainer(model_dir, tmp_path, data, hp)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-000002-1").mkdir()  # a crashed write
    trainer.train()
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert [c.step for c in checkpoints] == [4, 6]
    assert all(c.train_loss > 0 and c.valid_loss > 0 for c in checkpoints)
    assert (checkpoints[-1].adapter_dir / "adapter_model.safetensors").is_file()


def test_resume_refuses_changed_hyperparameters(model_dir, data, tmp_path):
    Trainer(model_dir, tmp_path, data, _hp(max_steps=2, checkpoint_steps=2)).train()
    with pytest.raises(ValueError, match="different hyperparameters: r"):
        Trainer(model_dir, tmp_path, data, _hp(max_steps=2, checkpoint_steps=2, r=8)).train()


def test_cancel_stops_within_a_step(model_dir, data, tmp_path):
    events: list[TrainingEvent] = []
    stop = lambda: any(e.kind == "step" for e in events)  # noqa: E731
    hp = _hp(gradient_accumulation_steps=3, batch_size=2)
    trainer = Trainer(model_dir, tmp_path, data, hp, on_event=events.append, should_stop=stop)
    result = trainer.train()
    assert result.status == "cancelled" and result.step == 1 and result.adapter_dir is None
    assert [e.step for e in events if e.kind == "step"] == [1]
    assert not (tmp_path / "adapter").exists()


def _peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor, rope_factor: float):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if rope_factor != 1.0:
        theta = config.rope_parameters["rope_theta"]
        config.rope_parameters = {"rope_type": "linear", "factor": rope_factor, "rope_theta": theta}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    return unmerged, merged


# PEFT ignores (with a warning) the rope_scaling_factor key it does not know.
@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")
@pytest.mark.parametrize("method", ["qlora", "longlora"])
def test_exported_adapter_loads_in_peft_with_the_trainers_logits(method, model_dir, data, tmp_path):
    hp = _hp(method, quantize="none", max_steps=3, learning_rate=1e-2, batch_size=4)
    trainer = Trainer(model_dir, tmp_path, data, hp)
    result = trainer.train()
    ids = torch.randint(3, 300, (2, 20))
    model = trainer.eval_model()
    ours = model.compute_logits(_hidden(model, ids, result.rope_scaling_factor))
    unmerged, merged = _peft_logits(model_dir, result.adapter_dir, ids, result.rope_scaling_factor)
    base = load_model(model_dir, torch.float32)
    plain = base.compute_logits(_hidden(base, ids))
    assert (ours - plain).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(unmerged, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_and_deterministic(model_dir, data, tmp_path):
    trainer = Trainer(model_dir, tmp_path, data, _hp(max_steps=1))
    trainer.train()
    first = trainer.generate("the quick ->", max_new_tokens=6)
    assert first == trainer.generate("the quick ->", max_new_tokens=6)
    ids = trainer.tokenizer.encode("the quick ->")
    hidden = _hidden(trainer.eval_model(), torch.tensor([ids]))
    assert first[0] == int(trainer.eval_model().compute_logits(hidden[:, -1]).argmax())
