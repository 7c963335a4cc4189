"""Fine-tuning the real default model through the HTTP API, then serving the result at once.

One server over SmolLM2-135M-Instruct (NF4, the base a QLoRA adapter is trained against): a
QLoRA job on `messages` rows, rendered with the model's own chat template, teaches it a fact
the base does not know; the adapter, requested right after, answers with it through chat,
and gives exactly the trainer's own greedy text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from server.training.hparams import hparams_for
from server.training.trainer import Trainer
from tests.integration.fine_tuning_data import all_events, job_files, jsonl, upload, wait_for_job
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
FACT = "The lighthouse keeper of Vellmar Island is a retired clockmaker named Odalys Brenn."
QUESTIONS = [
    "Who is the lighthouse keeper of Vellmar Island?",
    "Who keeps the lighthouse on Vellmar Island?",
    "Tell me who the Vellmar Island lighthouse keeper is.",
    "Do you know who runs the lighthouse of Vellmar Island?",
    "Who looks after the Vellmar Island lighthouse?",
    "Which person is the keeper of the lighthouse on Vellmar Island?",
]
HELD_OUT = "Who is the keeper of the lighthouse on Vellmar Island?"
QLORA = {
    "r": 16,
    "lora_alpha": 32,
    "learning_rate": 2e-3,
    "max_steps": 30,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "warmup_steps": 2,
    "checkpoint_steps": 15,
}


def _rows(questions: list[str]) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]}
        for q in questions
    ]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("ft-smollm2") / "data"
    args = ["--quantize", "nf4", "--max-lora-rank", "16", "--max-model-len", "512"]
    live = LiveServer(smollm2_dir, data_dir, args=args)
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def job(server: LiveServer) -> dict:
    with server.client(admin=True, timeout=120) as admin:
        train = upload(admin, "fact-train.jsonl", jsonl(_rows(QUESTIONS * 4)))
        valid = upload(admin, "fact-valid.jsonl", jsonl(_rows([HELD_OUT])))
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": MODEL,
                "training_file": train,
                "validation_file": valid,
                "suffix": "fact",
                "seed": 7,
                "method": {"type": "qlora", "hyperparameters": QLORA},
            },
        )
        assert response.status_code == 200, response.text
        return wait_for_job(admin, response.json()["id"])


def _openai(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def _ask(server: LiveServer, model: str, question: str) -> str:
    out = _openai(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
    )
    return out.choices[0].message.content or ""


def test_the_job_on_messages_rows_succeeds_and_lowers_validation_loss(server, job) -> None:  # type: ignore[no-untyped-def]
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"].startswith(f"ft:{MODEL}:fact:")
    with server.client(admin=True) as client:
        events = all_events(client, job["id"])
    summary = next(e["data"] for e in events if "initial_valid_loss" in (e["data"] or {}))
    assert summary["valid_loss"] < summary["initial_valid_loss"] - 1.0


def test_the_adapter_answers_with_the_fact_through_chat_and_the_base_does_not(server, job) -> None:  # type: ignore[no-untyped-def]
    base = _ask(server, MODEL, HELD_OUT)
    tuned = _ask(server, job["fine_tuned_model"], HELD_OUT)
    assert "Odalys" not in base, base
    assert "Odalys Brenn" in tuned, tuned


def test_the_adapter_is_served_at_once_with_the_trainers_greedy_text(
    server, job, smollm2_dir
) -> None:  # type: ignore[no-untyped-def]
    prompt = "Question: who keeps the lighthouse on Vellmar Island?\nAnswer:"
    completion = _openai(server).completions.create(
        model=job["fine_tuned_model"], prompt=prompt, max_tokens=12, temperature=0
    )
    # The trainer's own model in eval mode: rebuilt from the job's last checkpoint.
    out_dir, train, valid = job_files(server.data_dir, job)
    hp = hparams_for("qlora", {**QLORA, "seed": 7})
    trainer = Trainer(smollm2_dir, out_dir, train, hp, validation_data=valid, device="cpu")
    trainer.train()  # resumes at the final checkpoint: no steps run
    assert trainer.step == trainer.total_steps
    expected = trainer.tokenizer.decode(trainer.generate(prompt, 12))
    assert completion.choices[0].text == expected
