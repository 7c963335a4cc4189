"""QLoRA on the demo model: a task it has never seen gets clearly easier (slow: real model)."""

from __future__ import annotations

import pytest

from bench.training import make_sort_dataset
from server.demo import ensure_demo_model
from server.training.hparams import hparams_for
from server.training.trainer import Trainer


@pytest.mark.slow
def test_qlora_on_the_demo_model_clearly_lowers_validation_loss(tmp_path):
    model_dir = ensure_demo_model(progress=False)
    data = make_sort_dataset(tmp_path / "sort.jsonl", num_examples=200)
    hp = hparams_for(
        "qlora",
        {
            "learning_rate": 2e-3,
            "max_steps": 16,
            "gradient_accumulation_steps": 2,
            "checkpoint_steps": 0,
        },
    )
    trainer = Trainer(model_dir, tmp_path / "run", data, hp)
    result = trainer.train()
    assert result.valid_loss < result.initial_valid_loss - 1.0
