"""Fine-tuning job requests: what is refused (and why, by field), and how jobs are named."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from server.training.jobs import JobStore
from server.training.manager import JobManager, JobRequestError, _hyperparameters, fine_tuned_name
from tests.unit.adapter_fixtures import tiny_base


@pytest.fixture
def manager(tmp_path):  # type: ignore[no-untyped-def]
    store = JobStore(tmp_path)
    line = json.dumps({"prompt": "a", "completion": "b"}).encode()
    store.add_file("train.jsonl", "fine-tune", line, 1)
    registry = SimpleNamespace(max_lora_rank=64, base=tiny_base())
    return JobManager(store, registry, "base", tmp_path, "cpu", 1)  # type: ignore[arg-type]


def _file(manager: JobManager) -> str:
    return manager.store.list_files()[0][0].id


def _refused(manager: JobManager, body: dict, param: str, match: str) -> None:
    with pytest.raises(JobRequestError, match=match) as info:
        manager.create(body)
    assert info.value.param == param
    jobs, _ = manager.store.list_jobs()
    assert jobs == []


def test_a_valid_request_records_a_job_validating_its_files(manager):
    job = manager.create({"model": "base", "training_file": _file(manager)})
    assert job.status == "validating_files"
    assert manager.store.get_job(job.id).method == "qlora"
    events, _ = manager.store.events(job.id)
    assert any("Validating training file" in e.message for e in events)


def test_another_model_is_refused(manager):
    _refused(
        manager,
        {"model": "gpt-4o", "training_file": _file(manager)},
        "model",
        "fine-tuning is available for the served base model 'base'",
    )


def test_an_unknown_method_is_refused(manager):
    body = {"model": "base", "training_file": _file(manager), "method": {"type": "dpo"}}
    _refused(manager, body, "method.type", "method.type must be one of qlora, longlora")


def test_an_unknown_hyperparameter_is_named(manager):
    body = {
        "model": "base",
        "training_file": _file(manager),
        "method": {"type": "qlora", "hyperparameters": {"lerning_rate": 1e-3}},
    }
    _refused(manager, body, "method.hyperparameters", "lerning_rate")


def test_a_rank_the_server_cannot_serve_is_refused(manager):
    body = {
        "model": "base",
        "training_file": _file(manager),
        "method": {"type": "qlora", "hyperparameters": {"r": 128}},
    }
    _refused(manager, body, "method.hyperparameters.r", "exceeds the server's --max-lora-rank")


@pytest.mark.parametrize(
    ("target_modules", "match"),
    [
        ("(.*)*(.*)*(.*)*(.*)*Z", "targets no module of the base model"),
        (r"(a)\1", "target_modules .* is not a supported regular expression"),
        (["lm_head"], "LoRA on lm_head is not supported"),
    ],
)
def test_target_modules_are_matched_against_the_served_model_at_creation(
    manager, target_modules, match
):
    body = {
        "model": "base",
        "training_file": _file(manager),
        "method": {"type": "qlora", "hyperparameters": {"target_modules": target_modules}},
    }
    _refused(manager, body, "method.hyperparameters", match)


def test_a_missing_training_file_is_refused(manager):
    _refused(
        manager,
        {"model": "base", "training_file": "file-nope"},
        "training_file",
        "training_file 'file-nope' does not exist",
    )


def test_a_bad_suffix_is_refused(manager):
    body = {"model": "base", "training_file": _file(manager), "suffix": "no spaces"}
    _refused(manager, body, "suffix", "suffix must be 1-40 characters")


def test_openai_hyperparameter_names_are_mapped():
    got = _hyperparameters(
        {
            "type": "qlora",
            "qlora": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 2.0}},
        },
        {"batch_size": "auto"},
    )
    assert got == {"num_epochs": 3, "learning_rate": pytest.approx(4e-4)}


def test_a_job_stores_aliases_under_our_names(manager):
    body = {
        "model": "base",
        "training_file": _file(manager),
        "method": {"type": "qlora", "hyperparameters": {"lora_r": 8, "n_epochs": "auto"}},
    }
    assert manager.create(body).hyperparameters == {"r": 8}


def test_a_near_miss_in_a_job_request_is_refused_with_the_right_name(manager):
    body = {
        "model": "base",
        "training_file": _file(manager),
        "method": {"type": "qlora", "hyperparameters": {"lora_rnak": 8}},
    }
    _refused(manager, body, "method.hyperparameters", "did you mean 'lora_rank'")


def test_fine_tuned_model_names_carry_base_suffix_and_job():
    job = SimpleNamespace(id="ftjob-0123456789abcdef", model="base", suffix="sql")
    assert fine_tuned_name(job) == "ft:base:sql:01234567"  # type: ignore[arg-type]
    job.suffix = None
    assert fine_tuned_name(job) == "ft:base:01234567"  # type: ignore[arg-type]


def test_cancelling_a_queued_job_ends_it_at_once(manager):
    job = manager.create({"model": "base", "training_file": _file(manager)})
    assert manager.cancel(job.id).status == "cancelled"
    events, _ = manager.store.events(job.id)
    assert events[0].message == "The job was cancelled"


def test_files_page_newest_first_with_a_cursor(tmp_path):
    store = JobStore(tmp_path)
    ids = [store.add_file(f"{i}.jsonl", "fine-tune", b"x", 1).id for i in range(5)]
    store.add_file("other.jsonl", "batch", b"x", None)
    first, more = store.list_files("fine-tune", limit=2)
    assert [f.id for f in first] == ids[:-3:-1] and more
    second, more = store.list_files("fine-tune", after=first[-1].id, limit=2)
    assert [f.id for f in second] == ids[2:0:-1] and more
    last, more = store.list_files("fine-tune", after=second[-1].id, limit=2)
    assert [f.id for f in last] == ids[:1] and not more
    ascending, _ = store.list_files("fine-tune", after=ids[1], order="asc")
    assert [f.id for f in ascending] == ids[2:]
    assert len(store.list_files()[0]) == 6
