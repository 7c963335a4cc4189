"""`loraplex finetune` (server.training.cli): a run end to end, and bad input as exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.training.cli import run_finetune


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_writes_a_peft_adapter(model_dir, tmp_path, capsys):
    rows = [json.dumps({"text": f"the quick brown fox number {i}"}) for i in range(8)]
    data = _write(tmp_path / "train.jsonl", rows)
    argv = [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "run"),
        "--method",
        "longlora",
        "--hparam",
        "max_steps=2",
        "--hparam",
        "r=2",
        "--hparam",
        "checkpoint_steps=0",
        "--no-progress",
    ]
    assert run_finetune(argv) == 0
    out = capsys.readouterr().out
    assert f"adapter: {tmp_path / 'run' / 'adapter'}" in out
    assert "rope_scaling_factor: 2" in out
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rope_scaling_factor"] == 2.0


def test_bad_data_exits_2_naming_the_line(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [json.dumps({"text": "ok"}), '{"text": 5}'])
    argv = ["--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run")]
    assert run_finetune(argv) == 2
    assert "train.jsonl line 2: 'text' must be a string" in capsys.readouterr().err


def test_unknown_hyperparameter_exits_2_naming_it(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [json.dumps({"text": "ok"})])
    argv = [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "r"),
        "--hparam",
        "lora_rnak=4",
    ]
    assert run_finetune(argv) == 2
    assert "unknown hyperparameter 'lora_rnak'" in capsys.readouterr().err
