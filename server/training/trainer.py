"""The fine-tuning loop: QLoRA and LongLoRA on the project's own Llama model.

A job worker builds a Trainer (data is validated and tokenized at once, so a bad file fails
before the model loads), then calls train(). Events go to `on_event`; `should_stop` is polled
before every micro-batch, so a cancel takes effect within one optimizer step. Checkpoints go
to <output_dir>/checkpoints and a rerun of the same job resumes from the newest one; the final
PEFT adapter is written to <output_dir>/adapter.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.base import BaseModelInfo
from server.model.config import ModelConfig
from server.model.llama import LlamaForCausalLM
from server.model.quant import import_bitsandbytes
from server.model.tokenizer import Tokenizer
from server.training import checkpoint as ckpt
from server.training.data import (
    IGNORE_INDEX,
    Batch,
    DataSource,
    batch_order,
    collate,
    fingerprint,
    prepare_datasets,
)
from server.training.events import (
    EventCallback,
    StopCallback,
    TrainingEvent,
    TrainingResult,
    peak_memory_bytes,
)
from server.training.hparams import HParams
from server.training.lora import adapter_spec, peft_config
from server.training.model import build_training_model, greedy_generate, rope_scale_like

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
# Hyperparameters that may change between a checkpoint and its resumption.
_RESUMABLE_CHANGES = frozenset({"eval_steps", "checkpoint_steps", "keep_checkpoints"})


class Trainer:
    """One fine-tuning run: data -> model -> steps -> checkpoints -> PEFT adapter."""

    def __init__(
        self,
        model_dir: str | Path,
        output_dir: str | Path,
        train_data: DataSource,
        hparams: HParams | None = None,
        *,
        validation_data: DataSource | None = None,
        device: str | torch.device | None = None,
        on_event: EventCallback | None = None,
        should_stop: StopCallback | None = None,
        base_model_name: str | None = None,
    ) -> None:
        self.model_dir, self.output_dir = Path(model_dir), Path(output_dir)
        self.hp = (hparams or HParams()).validate()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 on GPUs as in QLoRA; CPU kernels are float32.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.on_event, self.should_stop = on_event, should_stop
        self.base_model_name = base_model_name or str(self.model_dir)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir, extra_eos_token_ids=self.config.eos_token_ids)
        original_len = self.config.max_position_embeddings
        self.rope_scaling_factor = self.hp.rope_scaling_factor(original_len)
        self.max_seq_len = self.hp.max_seq_len or self.hp.target_context(original_len)
        base = json.loads((self.model_dir / "config.json").read_text())
        self.spec = adapter_spec(self.hp, BaseModelInfo.from_hf_config(base))
        self.train_set, self.valid_set = prepare_datasets(
            train_data, validation_data, self.tokenizer, self.max_seq_len, self.hp
        )
        self.fingerprint = fingerprint(self.train_set)
        num_batches = math.ceil(len(self.train_set) / self.hp.batch_size)
        self.steps_per_epoch = math.ceil(num_batches / self.hp.gradient_accumulation_steps)
        self.total_steps = self.hp.max_steps or self.hp.num_epochs * self.steps_per_epoch
        self.use_s2 = self.hp.is_longlora and self.hp.s2_attn
        self.pad_multiple = 2 * self.hp.s2_num_groups if self.use_s2 else 1
        self.pad_id = min(self.tokenizer.eos_token_ids, default=0)
        self.step = 0
        self.model: LlamaForCausalLM | None = None
        self._orders: dict[int, list[list[int]]] = {}

    # ---- setup ------------------------------------------------------------------------------

    def adapter_config(self) -> dict[str, Any]:
        """adapter_config.json of the result (PEFT, plus rope_scaling_factor for LongLoRA)."""
        return peft_config(self.spec, self.hp, self.rope_scaling_factor, self.base_model_name)

    def adam_settings(self) -> dict[str, Any]:
        """AdamW's learning rate, betas, epsilon and weight decay from the hyperparameters."""
        hp = self.hp
        return {
            "lr": hp.learning_rate,
            "betas": (hp.adam_beta1, hp.adam_beta2),
            "eps": hp.adam_epsilon,
            "weight_decay": hp.weight_decay,
        }

    def warmup_schedule(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """A linear warmup over the configured steps, then a constant rate."""
        warmup = self.hp.num_warmup_steps(self.total_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

    def setup(self) -> None:
        """Load the base (NF4 for QLoRA/LongLoRA by default), add LoRA, build the optimizer."""
        self.model, self.adapter = build_training_model(
            self.model_dir, self.hp, self.spec, self.device, self.dtype
        )
        self.params = list(self.adapter.parameters())
        bnb = import_bitsandbytes()
        self.optimizer = bnb.optim.PagedAdamW(self.params, **self.adam_settings())
        self.scheduler = self.warmup_schedule(self.optimizer)
        if self.device.type == "cpu":
            logger.info("paged AdamW runs unpaged on the CPU (bitsandbytes pages GPU memory)")
        logger.info(
            "%s: %d trainable parameters, %d training / %d validation examples, %d steps",
            self.hp.method,
            self.adapter.num_parameters,
            len(self.train_set),
            len(self.valid_set),
            self.total_steps,
        )

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        """Run (or resume) to total_steps; export the adapter unless cancelled."""
        if self.model is None:
            self.setup()
        self._resume()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start, tokens = time.perf_counter(), 0
        initial = None
        if self.step == 0 and self.valid_set:
            initial = self.evaluate()
            self._emit("eval", valid_loss=initial)
        window: list[float] = []
        train_loss = valid_loss = None
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            outcome = self._train_step()
            if outcome is None:
                return self._result(
                    "cancelled", None, initial, valid_loss, train_loss, tokens, start
                )
            loss, lr, grad_norm, step_tokens = outcome
            self.step += 1
            tokens += step_tokens
            window.append(loss)
            tps = step_tokens / max(time.perf_counter() - step_start, 1e-9)
            self._emit(
                "step",
                loss=loss,
                learning_rate=lr,
                tokens=step_tokens,
                tokens_per_second=tps,
                grad_norm=grad_norm,
            )
            every = self.hp.checkpoint_steps
            if (every and self.step % every == 0) or self.step == self.total_steps:
                train_loss, window = sum(window) / len(window), []
                valid_loss = self.evaluate() if self.valid_set else None
                if every:
                    self._save_checkpoint(train_loss, valid_loss)
                else:
                    self._emit("eval", train_loss=train_loss, valid_loss=valid_loss)
            elif self.hp.eval_steps and self.step % self.hp.eval_steps == 0 and self.valid_set:
                self._emit("eval", valid_loss=self.evaluate())
        if valid_loss is None and self.valid_set:  # resumed at the end: nothing ran
            valid_loss = self.evaluate()
        adapter_dir = self.export(self.output_dir / ADAPTER_DIR)
        self.model.eval()
        return self._result(
            "succeeded", adapter_dir, initial, valid_loss, train_loss, tokens, start
        )

    def _train_step(self) -> tuple[float, float, float, int] | None:
        """One optimizer step over gradient_accumulation_steps batches; None if stopped."""
        assert self.model is not None
        epoch, index = divmod(self.step, self.steps_per_epoch)
        accumulate = self.hp.gradient_accumulation_steps
        micro = self._epoch_order(epoch)[index * accumulate : (index + 1) * accumulate]
        batches = [
            collate([self.train_set[i] for i in b], self.pad_id, self.pad_multiple) for b in micro
        ]
        # Normalize by the step's trained tokens, so long and short batches weigh per token.
        denom = sum(b.num_trainable for b in batches)
        total = 0.0
        for batch in batches:
            if self.should_stop is not None and self.should_stop():
                self.optimizer.zero_grad(set_to_none=True)
                return None
            loss_sum = self._loss_sum(batch.to(self.device))
            (loss_sum / denom).backward()
            total += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # bitsandbytes warns that paging is GPU-only; setup() logged that once.
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / denom, lr, float(grad_norm), sum(b.num_tokens for b in batches)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            lengths = [len(e.input_ids) for e in self.train_set]
            self._orders = {
                epoch: batch_order(
                    lengths, self.hp.batch_size, self.hp.seed, epoch, self.hp.group_by_length
                )
            }
        return self._orders[epoch]

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed next-token cross-entropy over trained tokens (logits only where needed)."""
        assert self.model is not None
        hidden = self.model(
            batch.input_ids,
            batch.positions,
            rope_scale_like(batch.positions, self.rope_scaling_factor),
        )
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.model.compute_logits(hidden[:, :-1][keep])  # [N, vocab] float32
        return F.cross_entropy(logits, targets[keep], reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-token loss on the validation set, in eval mode (full attention, no dropout)."""
        assert self.model is not None and self.valid_set
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(self.valid_set)), key=lambda i: len(self.valid_set[i].input_ids))
        total, count = 0.0, 0
        for start in range(0, len(order), self.hp.batch_size):
            chunk = [self.valid_set[i] for i in order[start : start + self.hp.batch_size]]
            batch = collate(chunk, self.pad_id).to(self.device)
            total += self._loss_sum(batch).item()
            count += batch.num_trainable
        self.model.train(was_training)
        return total / count

    # ---- checkpoints and results ------------------------------------------------------------

    def _save_checkpoint(self, train_loss: float, valid_loss: float | None) -> None:
        assert self.model is not None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
        }
        meta = {
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "epoch": self.step / self.steps_per_epoch,
            "hparams": self.hp.to_dict(),
            "data_fingerprint": self.fingerprint,
        }
        info = ckpt.save_checkpoint(
            self.output_dir / CHECKPOINTS_DIR,
            self.step,
            self._trainable_state(),
            state,
            (self.adapter_config(), self.adapter.export()),
            meta,
            self.hp.keep_checkpoints,
        )
        self._emit(
            "checkpoint",
            train_loss=train_loss,
            valid_loss=valid_loss,
            checkpoint_dir=str(info.path),
        )

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _resume(self) -> None:
        info = ckpt.latest_checkpoint(self.output_dir / CHECKPOINTS_DIR)
        if info is None:
            return
        if info.meta.get("data_fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint {info.path} was written for different training data")
        saved = info.meta.get("hparams", {})
        changed = sorted(
            k
            for k, v in self.hp.to_dict().items()
            if saved.get(k) != v and k not in _RESUMABLE_CHANGES
        )
        if changed:
            raise ValueError(
                f"checkpoint {info.path} was written with different hyperparameters: "
                + ", ".join(changed)
            )
        trainable, state = ckpt.load_checkpoint(info, self.device)
        with torch.no_grad():
            for name, p in self._trainable_state().items():
                p.copy_(trainable[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step = info.step
        self._emit("message", message=f"resumed from the checkpoint at step {info.step}")

    def checkpoints(self) -> list[ckpt.CheckpointInfo]:
        """This run's complete checkpoints, oldest first."""
        return ckpt.list_checkpoints(self.output_dir / CHECKPOINTS_DIR)

    def export(self, adapter_dir: str | Path) -> Path:
        """Write the PEFT adapter (plus rope_scaling_factor and saved modules) atomically."""
        adapter_dir = Path(adapter_dir)
        ckpt.write_adapter_atomically(adapter_dir, self.adapter_config(), self.adapter.export())
        logger.info("adapter written to %s", adapter_dir)
        return adapter_dir

    def eval_model(self) -> LlamaForCausalLM:
        """The trained model in eval mode (full attention, no dropout): the serving reference.

        Call it as model(ids [B, S], positions [B, S], rope_scale) with rope_scale filled with
        rope_scaling_factor (or None when that is 1.0), or use generate().
        """
        assert self.model is not None, "call setup() or train() first"
        return self.model.eval()

    def generate(self, prompt: str | list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation token ids from the eval-mode model (stops at EOS)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return greedy_generate(
            self.eval_model(),
            ids,
            max_new_tokens,
            self.rope_scaling_factor,
            self.tokenizer.eos_token_ids,
        )

    def _emit(self, kind: str, **fields: Any) -> None:
        event = TrainingEvent(kind, self.step, self.total_steps, **fields)
        logger.debug("training event %s", event.to_dict())
        if self.on_event is not None:
            self.on_event(event)

    def _result(
        self,
        status: str,
        adapter_dir: Path | None,
        initial: float | None,
        valid_loss: float | None,
        train_loss: float | None,
        tokens: int,
        start: float,
    ) -> TrainingResult:
        return TrainingResult(
            status=status,
            step=self.step,
            total_steps=self.total_steps,
            adapter_dir=adapter_dir,
            initial_valid_loss=initial,
            valid_loss=valid_loss,
            train_loss=train_loss,
            rope_scaling_factor=self.rope_scaling_factor,
            trained_tokens=tokens,
            train_seconds=time.perf_counter() - start,
            peak_memory_bytes=peak_memory_bytes(self.device),
        )
