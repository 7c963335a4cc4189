"""LLMEngine: add requests, step, abort. The offline API and the core of the server."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from server.config import ConfigError, EngineConfig
from server.engine.backends import Backends
from server.engine.errors import (
    AdapterBusyError,
    AdapterVersionGoneError,
    InvalidRequestError,
    UnknownAdapterError,
)
from server.engine.grammar import GrammarCompiler
from server.engine.logits_processors import accept_token
from server.engine.model_runner import ModelRunner
from server.engine.outputs import OutputText, RequestOutput
from server.engine.requests import Prompt, RequestFactory
from server.engine.sampler import NON_FINITE, Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.setup import (
    build_model,
    checkpoint_text_files,
    make_pool,
    pool_tenants,
    with_quantize_chosen,
)
from server.engine.stats import StepStats
from server.lora.batch import group_by_adapter
from server.lora.layers import enable_lora
from server.memory.kv_cache import KVCacheManager

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry

logger = logging.getLogger(__name__)
STALL_WAIT_S = 0.001  # offline generate: a pause while only adapter reads can progress


@dataclass
class _Request:
    seq: Sequence
    text: OutputText


def _non_finite_message(seq: Sequence) -> str:
    source = "the base model" if seq.adapter_name is None else f"adapter {seq.adapter_name!r}"
    return f"{source} produced non-finite values (inf or NaN) for this request"


class LLMEngine:
    def __init__(self, config: EngineConfig, registry: AdapterRegistry | None = None) -> None:
        if config.model is None:
            raise ConfigError("LLMEngine needs a model directory (the CLI resolves --model to one)")
        self.config = config = with_quantize_chosen(config)
        model_dir = Path(config.model)
        self.device = config.torch_device
        self.backends = Backends.choose(config)
        self.model = build_model(config, model_dir, self.backends.kernels)
        self.model_config = cfg = self.model.config
        self.model_name = model_dir.name
        self.tokenizer, self.generation_defaults = checkpoint_text_files(config, cfg)
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size)
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            logger.warning(
                "--max-model-len %d exceeds the model's max_position_embeddings %d",
                self.max_model_len,
                cfg.max_position_embeddings,
            )
        self.pool = make_pool(config, cfg)
        max_blocks = -(-self.max_model_len // self.pool.geometry.block_size)
        if max_blocks > self.pool.num_pages:
            raise ConfigError(
                f"the page pool ({self.pool.num_pages} pages of "
                f"{self.pool.geometry.block_size} tokens) cannot hold one sequence of "
                f"--max-model-len {self.max_model_len}; raise --pool-mb or lower --max-model-len"
            )
        self.registry = registry
        if registry is not None:
            enable_lora(self.model)
        tenants = pool_tenants(config, self.pool, cfg, registry, self.backends.lora)
        self.eviction_clock = tenants.clock
        self.adapter_cache = tenants.adapters
        self.prefix_cache = tenants.prefixes
        self.reclaimer = tenants.reclaimer
        self.kv = KVCacheManager(self.pool, reclaimer=self.reclaimer, prefix=self.prefix_cache)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.adapter_cache
        )
        self.runner = ModelRunner(
            self.model,
            self.pool,
            self.device,
            self.backends.kernels,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.max_model_len,
        )
        self.sampler = Sampler(config.max_num_seqs, self.device)
        self.requests = RequestFactory(
            self.tokenizer,
            self.grammars,
            cfg.vocab_size,
            self.max_model_len,
            registry,
            self.kv.max_blocks_per_seq,
            self.adapter_cache.pages_for if self.adapter_cache is not None else None,
            self.pool.num_pages,
            self.device,
            config.seed,
        )
        self._requests: dict[str, _Request] = {}
        self._retired_adapters: set[int] = set()  # old versions of reloaded adapters
        # The last step found work waiting but none it could run (adapters being read).
        self.stalled = False
        self._stats = StepStats()
        if self.warms_up:
            self._warm_up()  # last: it runs requests through everything built above

    @property
    def warms_up(self) -> bool:
        """Whether start-up compiles kernels and captures graphs before serving (CUDA)."""
        return self.device.type == "cuda"

    def _warm_up(self) -> None:
        """Before the server is ready: compile the kernel variants of a prefill and a decode
        step, then capture the decode CUDA graphs (unless --enforce-eager), so no request
        pays a compile or a capture."""
        start = time.perf_counter()
        prompt = list(range(1, min(32, self.max_model_len - 2) + 1))
        self.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        self._stats = StepStats()
        if self.config.enforce_eager:
            logger.info("--enforce-eager: decode steps run without CUDA graphs")
        elif not self.backends.decode_graphs(self.adapter_cache is not None):
            logger.info("decode CUDA graphs need the Triton kernel and LoRA backends; eager")
        else:
            from server.engine.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(self.runner, self.adapter_cache)
            graphs.capture()
            self.runner.graphs = graphs
        logger.info("warm-up done in %.1fs", time.perf_counter() - start)

    # ---- requests -------------------------------------------------------------------------

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self._requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already running")
        if seq.adapter_name is not None and (
            self.registry is None or self.registry.by_id(seq.adapter_id) is None
        ):
            # Made before an in-place reload whose old version is gone already: the new one,
            # unless the caller prepared the prompt for that version.
            if seq.adapter_pinned:
                raise AdapterVersionGoneError(seq.adapter_name)
            reg = self.registry.get(seq.adapter_name) if self.registry is not None else None
            if reg is None:
                raise UnknownAdapterError(f"adapter {seq.adapter_name!r} was deleted", "model")
            seq.adapter_id = reg.adapter_id
            seq.rope_scale = reg.spec.rope_scaling_factor
        decoder = self.tokenizer.decode_stream(seq.params.skip_special_tokens)
        self._requests[seq.request_id] = _Request(seq, OutputText(decoder, seq.params.stop))
        self.scheduler.add(seq)
        if seq.adapter_name is not None:
            self._stats.adapter_requests[seq.adapter_name] += 1

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        adapter_name: str | None = None,
    ) -> str:
        seq = self.requests.make(prompt, params, request_id, adapter_name)
        self.add_sequence(seq)
        return seq.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free what it holds; its final output, or None if unknown."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._end(req.seq, "abort", time.monotonic())
        self._free_retired_adapters()
        return self._output(req, [], [], finished=True)

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort_request(request_id)

    def requests_for_adapter(self, adapter_id: int) -> int:
        """Running and waiting requests using an adapter (engine thread)."""
        return sum(1 for r in self._requests.values() if r.seq.adapter_id == adapter_id)

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter and drop its device copy; refused while requests use it.

        Memory only, so the step thread never waits on the disk: the caller deletes the files
        with registry.store.delete(name) afterwards.
        """
        reg = self.registry.get(name) if self.registry is not None else None
        if reg is None:
            raise UnknownAdapterError(f"adapter {name!r} does not exist", "name")
        busy = self.requests_for_adapter(reg.adapter_id)
        if busy:
            raise AdapterBusyError(name, busy)
        assert self.adapter_cache is not None and self.registry is not None
        evicted = self.adapter_cache.evict_if_idle(reg.adapter_id)
        assert evicted, "an adapter with no requests must be idle"
        if self.prefix_cache is not None:
            self.prefix_cache.drop_adapter(reg.adapter_id)
        self.registry.forget(name)

    def retire_adapter(self, adapter_id: int) -> None:
        """An in-place reload replaced this adapter version: free it once no request uses it.
        Its cached prefix blocks go now (new requests hash under the new version anyway)."""
        if self.prefix_cache is not None:
            self.prefix_cache.drop_adapter(adapter_id)
        self._retired_adapters.add(adapter_id)
        self._free_retired_adapters()

    def _free_retired_adapters(self) -> None:
        for adapter_id in list(self._retired_adapters):
            if self.requests_for_adapter(adapter_id):
                continue
            assert self.adapter_cache is not None and self.registry is not None
            evicted = self.adapter_cache.evict_if_idle(adapter_id)
            assert evicted, "an adapter with no requests must be idle"
            self.registry.drop_retired(adapter_id)
            self._retired_adapters.discard(adapter_id)
            logger.info("freed the old version of a reloaded adapter (id %d)", adapter_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, and report what changed."""
        preemptions = self.scheduler.num_preemptions
        sched = self.scheduler.schedule()
        self._stats.num_preemptions += self.scheduler.num_preemptions - preemptions
        failed = self._end_unreadable()
        self.stalled = not sched.scheduled and not sched.preempted
        if not sched.scheduled:
            return failed
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        lora = None
        if self.adapter_cache is not None:
            group_by_adapter(sched.scheduled, lambda s: s.seq.adapter_id)
            token_counts = ((s.seq.adapter_id, s.num_new_tokens) for s in sched.scheduled)
            lora = self.adapter_cache.lora_batch(token_counts)
        start = time.perf_counter()
        logits = self.runner.execute(sched.scheduled, lora)
        self.scheduler.advance(sched)
        outputs = self._process(sched, logits)  # waits for the device: sampled tokens
        tokens = sched.num_batched_tokens
        if tokens > len(sched.scheduled):
            # A step with prefill: what recomputing a cached block would cost, per token.
            seconds = time.perf_counter() - start
            self.eviction_clock.prefill_seconds_per_token.add(seconds / tokens)
        if self._retired_adapters:
            self._free_retired_adapters()
        return failed + outputs

    def _end_unreadable(self) -> list[RequestOutput]:
        """Requests whose adapter's weights could not be read end alone, with an error."""
        errors = self.adapter_cache.take_load_errors() if self.adapter_cache is not None else {}
        if not errors:
            return []
        outputs = []
        for seq in [s for s in self.scheduler.waiting if s.adapter_id in errors]:
            seq.error = f"adapter {seq.adapter_name!r} could not be read from the adapter store"
            logger.warning("request %s failed: %s", seq.request_id, errors[seq.adapter_id])
            req = self._requests[seq.request_id]
            self._end(seq, "error", time.monotonic())
            outputs.append(self._output(req, [], [], finished=True))
        return outputs

    def _end(self, seq: Sequence, reason: str, now: float) -> None:
        """A request is over: free what it holds and count it."""
        del self._requests[seq.request_id]
        self.scheduler.finish(seq, reason)
        self.sampler.release(seq)
        self._stats.record_finish(seq, now)

    def _process(self, sched: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        sampling = [s.seq for s in sched.scheduled if s.samples]
        results = self.sampler(logits, sampling) if sampling else []
        now = time.monotonic()
        outputs = []
        for seq, (token, logprob) in zip(sampling, results, strict=True):
            req = self._requests[seq.request_id]
            if token == NON_FINITE:
                seq.error = _non_finite_message(seq)
                logger.warning("request %s failed: %s", seq.request_id, seq.error)
                reason: str | None = "error"
                new_ids: list[int] = []
            else:
                seq.append_token(token)
                accept_token(seq, token)
                self._stats.record_token(seq, now)
                reason = self._finish_reason(req, token)
                new_ids = [token]
            if reason is not None:
                self._end(seq, reason, now)
            outputs.append(
                self._output(req, new_ids, [logprob] if logprob else [], reason is not None)
            )
        return outputs

    def take_stats(self) -> StepStats:
        """What happened since the last call (engine thread only)."""
        stats, self._stats = self._stats, StepStats()
        if self.adapter_cache is not None:
            stats.adapter_load_seconds = self.adapter_cache.take_load_times()
        return stats

    def _finish_reason(self, req: _Request, token: int) -> str | None:
        seq, p = req.seq, req.seq.params
        if token in self.tokenizer.eos_token_ids and not p.ignore_eos:
            return "stop"
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        stop = req.text.append(token)
        if stop is not None:
            seq.stop_reason = stop
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(
        self, req: _Request, new_ids: list[int], logprobs: list, finished: bool
    ) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=req.text.take(finished),
            token_ids=seq.output_token_ids,
            text=req.text.text[: req.text.released],
            finished=finished,
            num_prompt_tokens=seq.num_prompt_tokens,
            finish_reason=seq.finish_reason if finished else None,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
            adapter_name=seq.adapter_name,
            error=seq.error,
            num_cached_tokens=seq.num_cached_tokens,
        )

    # ---- offline --------------------------------------------------------------------------

    def generate(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams],
        adapter_names: Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion together; final outputs in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        names = adapter_names or [None] * len(prompts)
        ids = [
            self.add_request(p, sp, adapter_name=a)
            for p, sp, a in zip(prompts, params, names, strict=True)
        ]
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {i: [] for i in ids}
        while self.has_unfinished_requests():
            if self.stalled:
                time.sleep(STALL_WAIT_S)  # adapters are being read: let the loader run
            for out in self.step():
                logprobs[out.request_id].extend(out.logprobs)
                if out.finished:
                    final[out.request_id] = out
        for rid, out in final.items():
            out.logprobs = logprobs[rid]
        return [final[i] for i in ids]
