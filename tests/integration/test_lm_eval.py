"""lm-eval evaluates an adapter through the server (`local-completions`): a multiple-choice task
whose per-choice log-likelihoods equal those of lm-eval's own `hf` backend with `peft=` on the
same adapter (float32), and a generate task whose outputs equal the engine's own.

Offline: the tasks and their data are local files (tests/data/lm_eval), nothing comes from a
hub. The model is a parameter (EVAL_MODELS): the tiny random Llama, and the real default model
SmolLM2-135M-Instruct, whose generate task is checked against lm-eval's hf backend as well.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.engine.sampling_params import SamplingParams
from tests.integration.conftest import Oracle, adapter_name
from tests.integration.live_server import REPO_ROOT, LiveServer
from tests.peft_reference import save_peft_adapter

lm_eval = pytest.importorskip("lm_eval")

DATA = REPO_ROOT / "tests" / "data" / "lm_eval"
TOL = 1e-4
MC_TASK = "loraplex_multiple_choice"
GEN_TASK = "loraplex_generate"
# The adapter on SmolLM2: attention and MLP, so the scores depend on every kind of LoRA layer.
SMOLLM2_LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])


@dataclass
class EvalModel:
    """A server, the base checkpoint it serves (Hugging Face layout, for lm-eval's hf backend
    and tokenizer), and one adapter on it: its name there and its PEFT directory."""

    server: LiveServer
    model_dir: Path
    adapter: str
    adapter_dir: Path
    oracle: Oracle | None = None  # the engine offline, for the generate task's outputs


def _tiny(request: pytest.FixtureRequest) -> EvalModel:
    adapters: dict[str, Path] = request.getfixturevalue("adapter_dirs")
    name = adapter_name(2)  # rank 2 on every linear
    return EvalModel(
        request.getfixturevalue("server"),
        request.getfixturevalue("model_dir"),
        name,
        adapters[name],
        request.getfixturevalue("oracle"),
    )


@pytest.fixture(scope="module")
def smollm2_eval(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EvalModel]:
    """The real default model, SmolLM2-135M-Instruct (float32), served with one PEFT adapter."""
    root = tmp_path_factory.mktemp("smollm2-eval")
    adapter_dir = save_peft_adapter(
        smollm2_dir, root / "adapters" / "eval-r8", seed=3, **SMOLLM2_LORA
    )
    args = ["--max-model-len", "512", "--max-lora-rank", "8"]
    args += ["--preload-adapters", str(adapter_dir.parent)]
    live = LiveServer(smollm2_dir, root / "data", args).start()
    yield EvalModel(live, smollm2_dir, adapter_dir.name, adapter_dir)
    live.stop()


EVAL_MODELS: dict[str, Callable[[pytest.FixtureRequest], EvalModel]] = {
    "tiny-llama": _tiny,
    "smollm2": lambda request: request.getfixturevalue("smollm2_eval"),
}


@pytest.fixture(params=list(EVAL_MODELS))
def eval_model(request: pytest.FixtureRequest) -> EvalModel:
    return EVAL_MODELS[request.param](request)


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """lm-eval's task manager over the two local tasks (their data by absolute path)."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = {
        MC_TASK: {
            "output_type": "multiple_choice",
            "data": "multiple_choice.jsonl",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        },
        GEN_TASK: {
            "output_type": "generate_until",
            "data": "generate.jsonl",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for task, config in configs.items():
        data = config.pop("data")
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(DATA / data)}},
            "test_split": "test",
            **config,
        }
        (tmp_path / f"{task}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return TaskManager(include_path=str(tmp_path), include_defaults=False)  # no built-in index


def _evaluate(model: str, model_args: dict[str, Any], task: str, tasks) -> list[dict]:  # type: ignore[no-untyped-def]
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=tasks, log_samples=True
    )
    assert results is not None
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _through_server(m: EvalModel, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """local-completions' model_args for the adapter on the server (batches of 4 prompts)."""
    if m.server.api_key:
        monkeypatch.setenv("OPENAI_API_KEY", m.server.api_key)
    return {
        "model": m.adapter,
        "base_url": f"{m.server.url}/v1/completions",
        "tokenizer": str(m.model_dir),
        "tokenizer_backend": "huggingface",
        "batch_size": 4,
        "max_retries": 1,
    }


def _with_peft(m: EvalModel) -> dict[str, Any]:
    """lm-eval's hf backend's model_args for the same adapter, float32 on the CPU."""
    return {
        "pretrained": str(m.model_dir),
        "peft": str(m.adapter_dir),
        "dtype": "float32",
        "device": "cpu",
    }


def test_multiple_choice_loglikelihoods_equal_lm_evals_hf_backend_with_peft(
    eval_model: EvalModel, tasks, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    served = _evaluate(
        "local-completions", _through_server(eval_model, monkeypatch), MC_TASK, tasks
    )
    reference = _evaluate("hf", _with_peft(eval_model), MC_TASK, tasks)
    assert len(served) == len(reference) > 0
    for ours, theirs in zip(served, reference, strict=True):
        assert len(ours["resps"]) == len(theirs["resps"]) == len(ours["doc"]["choices"])
        for [(ll, greedy)], [(ref_ll, ref_greedy)] in zip(
            ours["resps"], theirs["resps"], strict=True
        ):
            assert ll == pytest.approx(ref_ll, abs=TOL)
            assert greedy == ref_greedy


def test_a_generate_task_runs_through_the_server(
    eval_model: EvalModel, tasks, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    served = _evaluate(
        "local-completions", _through_server(eval_model, monkeypatch), GEN_TASK, tasks
    )
    assert len(served) == 4
    if eval_model.oracle is None:  # the real model: lm-eval's own hf backend, greedy, with peft
        reference = _evaluate("hf", _with_peft(eval_model), GEN_TASK, tasks)
        assert [s["resps"] for s in served] == [s["resps"] for s in reference]
        return
    engine = eval_model.oracle.engine
    params = SamplingParams(max_tokens=6, temperature=0, stop=["\n"])
    for sample in served:
        [[text]] = sample["resps"]
        prompt = engine.tokenizer.encode(sample["doc"]["prompt"], add_special_tokens=False)
        [expected] = engine.generate([prompt], params, [eval_model.adapter])
        assert text == expected.text
