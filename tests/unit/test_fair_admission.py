"""Fair admission: waiting sequences are ordered by start-time fair queuing over tenants, so
one tenant's flood does not queue another tenant's small request behind all of it, while
each tenant's own sequences (and a lone tenant's) keep first come, first served."""

from __future__ import annotations

import torch

from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.memory.kv_cache import KVCacheManager
from server.memory.page_pool import PageGeometry, PagePool

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def scheduler(max_num_seqs: int = 2) -> Scheduler:
    pool = PagePool(256, PageGeometry(1, 1, 2, 4), torch.float32, torch.device("cpu"))
    return Scheduler(KVCacheManager(pool), max_num_seqs, max_num_batched_tokens=4096)


def seq(name: str, tenant: str, num_tokens: int = 40) -> Sequence:
    return Sequence(name, list(range(1, num_tokens + 1)), PARAMS, tenant=tenant)


def test_a_small_request_of_another_tenant_goes_ahead_of_a_queued_flood() -> None:
    sched = scheduler()
    for i in range(50):
        sched.add(seq(f"flood-{i}", "key:inference"))
    sched.add(seq("small", "key:admin", num_tokens=3))
    order = [s.request_id for s in sched.waiting]
    assert order[:3] == ["flood-0", "small", "flood-1"]
    admitted = [s.seq.request_id for s in sched.schedule().scheduled]
    assert admitted == ["flood-0", "small"]


def test_a_tenant_arriving_while_a_flood_runs_goes_ahead_of_the_rest_of_it() -> None:
    sched = scheduler(max_num_seqs=1)
    for i in range(20):
        sched.add(seq(f"flood-{i}", "a"))
    for _ in range(3):  # the flood's first three run (one at a time) and finish
        out = sched.schedule()
        sched.finish(out.scheduled[0].seq, "stop")
    sched.add(seq("late", "b"))
    # "Now" is the tag of flood-2, the latest admitted: before the tags of all that waits.
    assert [s.request_id for s in sched.waiting][:2] == ["late", "flood-3"]


def test_tenants_with_equal_work_alternate() -> None:
    sched = scheduler()
    for i in range(3):
        sched.add(seq(f"a{i}", "a"))
    for i in range(3):
        sched.add(seq(f"b{i}", "b"))
    assert [s.request_id for s in sched.waiting] == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_one_tenant_is_first_come_first_served() -> None:
    sched = scheduler()
    names = [f"r{i}" for i in range(10)]
    for i, name in enumerate(names):
        sched.add(seq(name, "", num_tokens=5 + 7 * (i % 3)))
    assert [s.request_id for s in sched.waiting] == names
