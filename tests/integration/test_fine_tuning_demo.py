"""Fine-tuning the demo model through the HTTP API, then serving the results.

One server over the real demo model (NF4, as served by default): a QLoRA job that must lower
validation loss and whose adapter, requested right after, must give the trainer's own greedy
text; a LongLoRA job that doubles the context and must beat plain RoPE on long inputs; and
both adapters served in one batch.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from server.model.tokenizer import Tokenizer
from server.training.hparams import hparams_for
from server.training.trainer import Trainer
from tests.integration.fine_tuning_data import (
    all_events,
    job_files,
    jsonl,
    ordering_task,
    repeated_passages,
    upload,
    wait_for_job,
)
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.slow

MODEL = "demo-model"
QLORA = {
    "r": 16,
    "learning_rate": 2e-3,
    "num_epochs": 3,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "checkpoint_steps": 20,
}
LONGLORA = {
    "max_steps": 120,
    "learning_rate": 1e-3,
    "warmup_steps": 2,
    "gradient_accumulation_steps": 1,
    "checkpoint_steps": 0,
}


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("ft-demo") / "data"
    live = LiveServer(
        demo_model_dir,
        data_dir,
        args=[
            "--quantize",
            "nf4",
            "--max-lora-rank",
            "64",
            "--max-model-len",
            "512",
            "--served-model-name",
            MODEL,
        ],
    )
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def qlora_job(server: LiveServer) -> dict:
    with server.client(admin=True, timeout=120) as admin:
        train = upload(admin, "order-train.jsonl", jsonl(ordering_task(96, seed=1)))
        valid = upload(admin, "order-valid.jsonl", jsonl(ordering_task(16, seed=2)))
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": MODEL,
                "training_file": train,
                "validation_file": valid,
                "suffix": "order",
                "seed": 7,
                "method": {"type": "qlora", "hyperparameters": QLORA},
            },
        )
        assert response.status_code == 200, response.text
        return wait_for_job(admin, response.json()["id"])


@pytest.fixture(scope="module")
def longlora_job(server: LiveServer, demo_model_dir: Path) -> dict:
    from server.demo.corpus import load_corpus

    tok = Tokenizer(demo_model_dir)
    texts = [d.text for d in load_corpus().train]

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    rows = repeated_passages(texts, encode, tok.decode, 72, seed=0)
    with server.client(admin=True, timeout=120) as admin:
        train = upload(admin, "long-train.jsonl", jsonl(rows[:64]))
        valid = upload(admin, "long-valid.jsonl", jsonl(rows[64:]))
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": MODEL,
                "training_file": train,
                "validation_file": valid,
                "suffix": "long",
                "method": {"type": "longlora", "hyperparameters": LONGLORA},
            },
        )
        assert response.status_code == 200, response.text
        return wait_for_job(admin, response.json()["id"])


def _openai(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def test_qlora_job_succeeds_and_lowers_validation_loss(server, qlora_job):
    assert qlora_job["status"] == "succeeded", qlora_job["error"]
    assert qlora_job["fine_tuned_model"].startswith(f"ft:{MODEL}:order:")
    assert qlora_job["trained_tokens"] > 0
    with server.client(admin=True) as client:
        events = all_events(client, qlora_job["id"])
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{qlora_job['id']}/checkpoints").json()
    steps = [e for e in events if e["type"] == "metrics" and "learning_rate" in (e["data"] or {})]
    assert steps and all(e["data"]["train_loss"] > 0 for e in steps)
    summary = next(e["data"] for e in events if "initial_valid_loss" in (e["data"] or {}))
    assert summary["valid_loss"] < summary["initial_valid_loss"] - 0.5
    assert checkpoints["data"] and "valid_loss" in checkpoints["data"][0]["metrics"]


def test_qlora_adapter_is_served_at_once_with_the_trainers_greedy_text(
    server, qlora_job, demo_model_dir
):
    prompt = "Order: 7 2 9 4\nAnswer:"
    completion = _openai(server).completions.create(
        model=qlora_job["fine_tuned_model"], prompt=prompt, max_tokens=12, temperature=0
    )
    # The trainer's own model in eval mode: rebuilt from the job's last checkpoint.
    out_dir, train, valid = job_files(server.data_dir, qlora_job)
    hp = hparams_for("qlora", {**QLORA, "seed": 7})
    trainer = Trainer(demo_model_dir, out_dir, train, hp, validation_data=valid, device="cpu")
    trainer.train()  # resumes at the final checkpoint: no steps run
    assert trainer.step == trainer.total_steps
    expected = trainer.tokenizer.decode(trainer.generate(prompt, 12))
    assert completion.choices[0].text == expected


def test_longlora_job_extends_context_and_beats_plain_rope_on_long_inputs(
    server, longlora_job, demo_model_dir
):
    from peft import PeftModel

    from tests.hf_reference import load_hf
    from tests.peft_reference import _with_linear_rope

    assert longlora_job["status"] == "succeeded", longlora_job["error"]
    name = longlora_job["fine_tuned_model"]
    with server.client() as client:
        info = client.get(f"/v1/adapters/{name}").json()
    assert info["rope_scaling_factor"] == 2.0
    assert "model.embed_tokens" in info["saved_modules"]
    assert any(m.endswith("norm") for m in info["saved_modules"])

    out_dir, _, valid = job_files(server.data_dir, longlora_job)
    tok = Tokenizer(demo_model_dir)
    long_inputs = [tok.encode(r["text"]) for r in _rows(valid)]
    assert min(len(ids) for ids in long_inputs) > 256 * 1.5  # well past the base context
    base = _loss(load_hf(demo_model_dir), long_inputs)
    adapted = PeftModel.from_pretrained(
        _with_linear_rope(demo_model_dir, 2.0), str(out_dir / "adapter")
    )
    assert _loss(adapted.eval(), long_inputs) < base - 0.05


def test_both_kinds_of_adapter_are_served_in_one_batch(server, qlora_job, longlora_job):
    client = _openai(server)
    long_prompt = " ".join(["The for statement is used to iterate over a sequence."] * 30)
    requests = [
        (qlora_job["fine_tuned_model"], "Order: 3 8 1 5\nAnswer:"),
        (longlora_job["fine_tuned_model"], long_prompt),
    ] * 3

    def complete(model_prompt: tuple[str, str]) -> str:
        model, prompt = model_prompt
        out = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        return out.choices[0].text

    alone = [complete(r) for r in requests[:2]]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(complete, requests))
    assert together == alone * 3


def _rows(path: Path | None) -> list[dict]:
    import json

    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loss(model, inputs: list[list[int]]) -> float:  # type: ignore[no-untyped-def]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in inputs:
            t = torch.tensor([ids])
            logits = model(t).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total / count
