"""Build the pieces of a run (`build_*`), then a short loop: step, measure, evaluate, checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distrib import checkpoint as ckpt
from distrib.config import Config, DataConfig, ModelConfig, to_dict
from distrib.data.loader import Batch, TokenLoader, build_loaders
from distrib.data.mixture_loader import MixtureValidation
from distrib.data.shards import TokenShards
from distrib.data.tokenizer import Tokenizer
from distrib.data.verify import report_leftovers
from distrib.engines.base import Engine, StepResult
from distrib.engines.build import build_engine
from distrib.errors import ConfigError, TrainingDiverged
from distrib.models.build import build_on_meta
from distrib.models.lora import apply_lora
from distrib.models.transformer import num_params
from distrib.runtime import Runtime, seed_everything
from distrib.train.faults import Faults
from distrib.train.guard import LossGuard, failing_ranks
from distrib.train.metrics import (
    MetricsLogger,
    StepTimes,
    Throughput,
    flops_per_token,
    idle_expert_params,
    memory_stats,
    peak_tflops,
)
from distrib.train.signals import StopRequest
from distrib.train.stragglers import StragglerMonitor


def check_dataset(
    data: DataConfig, model: ModelConfig, report: Callable[[str], None] | None = None
) -> TokenShards:
    """Open (and spot-check) the prepared training split, check it is of `data.format` (text,
    or chat / preference examples: then an `ExampleShards`) and that the model can embed its
    vocabulary; runs before any process group or model exists, so a mismatch costs nothing.
    With `report` (one rank), working folders that interrupted preparations left next to the
    dataset are reported there, never removed: a preparation may still be running."""
    from distrib.data.loader import open_split

    if data.streaming:  # nothing prepared: the tokenizer is what must fit
        from distrib.data.prepare import load_tokenizer

        load_tokenizer(data.tokenizer, model.vocab_size)
        return None  # type: ignore[return-value]
    if report is not None:
        report_leftovers(data.dir, report)
    shards = open_split(data, "train")
    if shards.vocab_size > model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({shards.vocab_size}) in {data.dir}: set model.vocab_size >= {shards.vocab_size}"
        )
    return shards


def build_data(
    cfg: Config,
    dp_rank: int,
    dp_size: int,
    pin_memory: bool = False,
    train_shards: TokenShards | None = None,
) -> tuple[TokenLoader, TokenLoader]:
    """This rank's training and validation loaders (`ExampleLoader`s, same interface, for chat
    and preference data); `pin_memory` for a CUDA device, so the copies of its batches to the
    device overlap with compute."""
    return build_loaders(cfg.data, cfg.training, dp_rank, dp_size, pin_memory, train_shards)


# More rollbacks than this in one run means the divergence is not one bad batch.
MAX_ROLLBACKS = 5


def _refuse(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """The `accept` of a step whose batch is passed over: compute it, apply nothing."""
    return False


class Trainer:
    """Holds the built pieces of one run and trains it; `train()` is the whole loop."""

    def __init__(
        self, cfg: Config, runtime: Runtime, train_shards: TokenShards | None = None
    ) -> None:
        """`train_shards`: the training split as `check_dataset` opened it, if the caller
        already did (opening spot-checks every shard: once per process is enough)."""
        self.cfg = cfg
        self.runtime = runtime
        self.run_dir = Path(cfg.job.run_dir)
        train_shards = train_shards or check_dataset(cfg.data, cfg.model)
        # Before any other work: the run folder is this run's (locked, identified) or we stop.
        self.run_folder = ckpt.claim_on_every_rank(
            self.run_dir, cfg.checkpoint.resume, cfg.job.overwrite, runtime.is_main
        )
        seed_everything(cfg.training.seed)
        self.engine: Engine
        self.engine, self.dp_rank, self.dp_size = build_engine(cfg, runtime)
        # Fault tolerance: this job is one replica group, which the engine joins to the others.
        self.replicas = self.engine.replicas
        self.train_loader, self.val_loader = build_data(
            cfg, self.dp_rank, self.dp_size, runtime.device.type == "cuda", train_shards
        )
        if self.replicas is not None:
            self.replicas.register_state(self._replica_state, self._load_replica_state)
        info = {
            "engine": cfg.parallel.engine,
            "world_size": runtime.world_size,
            "layout": to_dict(cfg)["parallel"],
            "config": to_dict(cfg),
        }
        self.checkpointer = ckpt.Checkpointer(cfg.checkpoint, self.run_dir, info, self.run_folder)
        # The step reached, and the steps whose batch is passed over after a rollback
        # (training.on_nonfinite = rollback).
        self.state = ckpt.TrainState()
        self.rollbacks = 0
        self.guard = LossGuard(cfg.training.spike_threshold, cfg.training.spike_window)
        self.stop = StopRequest()
        self.faults = Faults(cfg.debug, runtime.rank, self.run_dir)
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
        # What the progress bar shows until the first logged step: no loss rather than "nan".
        self._shown: tuple[float | None, float, float | None] = (None, cfg.training.lr, None)
        self.val_metrics: dict[str, float] = {}  # the objective's figures at the last evaluation
        self._targets: dict[str, float] = {}  # this step's supervised-token count (SFT)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: the engine's state, the loader's
        position, the train state and this rank's random generators."""
        return {
            **self.engine.checkpoint_state(),
            "train_loader": self.train_loader,
            "train": self.state,
            "rng": ckpt.RNGState(self.runtime.rank),
        }

    def _replica_state(self) -> dict[str, Any]:
        """What a healing replica group receives from this one: engine, loader and step."""
        return {
            **self.engine.replica_state(),
            "loader": self.train_loader.state_dict(),
            "train": self.state.state_dict(),
        }

    def _load_replica_state(self, state: dict[str, Any]) -> None:
        self.engine.load_replica_state(state)
        self.train_loader.load_state_dict(state["loader"])
        self.state.load_state_dict(state["train"])

    def save_checkpoint(self, background: bool) -> Path:
        """Every rank together: the checkpoint of the current step."""
        return self.checkpointer.save(self.step, self.checkpoint_state(), background)

    def load_checkpoint(self, path: Path) -> None:
        """Restore engine, loader, step, skipped steps and this rank's RNG from `path`."""
        self.checkpointer.load(path, self.checkpoint_state())

    def resume(self, report: Callable[[str], None]) -> Path | None:
        """Load the checkpoint `checkpoint.resume` points at, if any; damaged ones are reported
        and passed over (auto) or refused (an explicit path)."""
        path = self.checkpointer.resume_path(report=report)
        if path is not None:
            self.load_checkpoint(path)
        return path

    def _prepare_run_dir(self, log: MetricsLogger) -> None:
        if not self.runtime.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        # Generation and export need the tokenizer even if the dataset folder moves later.
        if self.cfg.data.streaming:
            Tokenizer.load(self.cfg.data.tokenizer).save(self.run_dir / "tokenizer.json")
        else:
            shutil.copyfile(
                Path(self.cfg.data.dir) / "tokenizer.json", self.run_dir / "tokenizer.json"
            )
        # And the chat template of fine-tuning data: generate --chat and export render with it.
        template = Path(self.cfg.data.dir) / "chat_template.jinja"
        if template.is_file():
            shutil.copyfile(template, self.run_dir / template.name)
        cfg = self.cfg
        model = build_on_meta(cfg.model)
        n = num_params(model)
        idle = idle_expert_params(cfg.model)
        active = f" ({(n - idle) / 1e6:.2f}M active)" if idle else ""
        if apply_lora(model, cfg.lora):
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            active += f", {trainable / 1e6:.3f}M trainable (LoRA rank {cfg.lora.rank})"
        log.write(
            f"model: {n / 1e6:.2f}M parameters{active}, "
            f"{flops_per_token(cfg.model, cfg.data.seq_len) / 1e6:.1f} MFLOP/token; "
            f"{self.tokens_per_step} tokens/step in {self.train_loader.grad_accum_steps} "
            f"micro-batch(es) per rank; device {self.runtime.device}"
        )

    def evaluate(self) -> float:
        """Mean validation loss over the first `eval_steps` global batches of the split; for a
        mixture, of each source's split (`val_loss/<name>`), averaged with the first weights."""
        if isinstance(self.val_loader, MixtureValidation):
            mix = self.val_loader
            per_source = {name: self._val_loss(loader) for name, loader in mix.loaders.items()}
            self.val_metrics = {f"val_loss/{n}": v for n, v in per_source.items()}
            self.val_metrics.update(
                {f"val_ppl/{n}": math.exp(min(v, 50.0)) for n, v in per_source.items()}
            )
            return sum(mix.weights[n] * v for n, v in per_source.items())
        loss = self._val_loss(self.val_loader)
        self.val_metrics = {
            f"val_{name}": float(value) for name, value in self.engine.objective_metrics().items()
        }
        return loss

    def _val_loss(self, loader: Any) -> float:
        loader.reset()
        steps = min(self.cfg.training.eval_steps, loader.steps_per_epoch)
        losses = [self.engine.eval_loss(loader.next_step()) for _ in range(steps)]
        return float(torch.stack(losses).mean())

    def _attach_reference(self, report: Callable[[str], None]) -> None:
        """DPO: the starting model's log-probabilities of every pair, read back or computed
        now, before any checkpoint replaces the starting weights (`distrib.train.reference`)."""
        from distrib.train import reference

        cfg = self.cfg
        recipe = {
            "dataset": reference.dataset_digest(cfg.data.dir),
            "init_from": cfg.model.init_from,
        }
        tables = reference.load_or_compute(
            self.run_dir / reference.REFERENCE_FILE,
            recipe,
            {"train": self.train_loader, "val": self.val_loader},
            self.engine,
            self.dp_rank,
            self.dp_size,
            self.runtime.is_main,
            report,
        )
        self.train_loader = reference.WithReference(self.train_loader, tables["train"])
        self.val_loader = reference.WithReference(self.val_loader, tables["val"])

    def _resume_and_open_log(self) -> MetricsLogger:
        """Resume (reporting damaged checkpoints passed over), then open the metrics log at
        the step reached and write the run folder's config and tokenizer."""
        notes: list[str] = []
        if self.cfg.training.objective == "dpo":
            self._attach_reference(notes.append)
        resumed = self.resume(notes.append)
        log = MetricsLogger(
            self.cfg.metrics,
            self.run_dir,
            self.runtime.is_main,
            self.cfg.training.steps,
            self.step,
            to_dict(self.cfg),
        )
        self._prepare_run_dir(log)
        for note in [*self.run_folder.notes, *notes]:
            log.write(note)
        if resumed is not None:
            log.write(f"resumed from {resumed} at step {self.step}")
        if self.replicas is not None:
            self.replicas.resumed_at(self.step)
        return log

    def train(self) -> dict[str, Any]:
        """Run from the current step to `training.steps` (or a stop signal); returns the last
        logged record."""
        t, m = self.cfg.training, self.cfg.metrics
        log = self._resume_and_open_log()
        peak = peak_tflops(self.runtime.device, t.dtype, m.peak_tflops)
        meter = Throughput(
            # Per-device figures divide by every device, not just the data-parallel ones.
            flops_per_token(self.cfg.model, self.cfg.data.seq_len),
            self.runtime.world_size,
            peak,
        )
        monitor = StragglerMonitor(m.straggler_every, m.straggler_threshold, self.runtime.rank)
        times = StepTimes()
        self._last_record: dict[str, Any] = {}
        start = time.perf_counter()
        if threading.current_thread() is threading.main_thread():
            self.stop.install()
        synchronizing = (
            self.replicas.synchronizing(self.step)
            if self.replicas is not None
            else contextlib.nullcontext()
        )
        try:
            last = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
            with synchronizing:
                self._loop(last, log, meter, monitor, times, start)
            self.checkpointer.wait()
        finally:
            self.stop.uninstall()
            log.close()
            self.run_folder.release()
            if self.replicas is not None:
                self.replicas.shutdown()
        return self._last_record

    def _loop(
        self,
        last: int,
        log: MetricsLogger,
        meter: Throughput,
        monitor: StragglerMonitor,
        times: StepTimes,
        start: float,
    ) -> None:
        """Train up to step `last`, or until a stop signal is agreed."""
        while self.step < last:
            if self.replicas is not None:
                # Joining the quorum may heal this group: step and loader jump to a peer's.
                self.replicas.begin_step()
                if self.step >= last:
                    break
            step_start = time.perf_counter()
            position = self.train_loader.state_dict() if self.replicas is not None else None
            batches = self.train_loader.next_step()
            self._targets = self._target_tokens(batches)
            self.faults.record_samples(self.step + 1, batches)
            self.faults.sleep()
            ready_at = time.time()  # wall clock: compared across ranks (see stragglers.py)
            times.add("time_data_s", time.perf_counter() - step_start)
            passed_over = self.step + 1 in self.state.skip_steps
            with self.faults.step_context(self.engine.model, self.step + 1):
                result = self.engine.train_step(
                    batches,
                    timed=self._logs(self.step + 1),
                    accept=_refuse if passed_over else self.guard,
                )
            if not result.committed:
                log.write(
                    f"step {self.step + 1}: not committed (a replica group failed during it); "
                    "redone on the same batch"
                )
                self.train_loader.load_state_dict(position)
                continue
            lr = self.engine.lr()  # the rate this step used; the scheduler has moved on
            self.step += 1
            if passed_over:
                log.write(f"step {self.step}: batch passed over (rolled back from it before)")
            elif result.skipped and self._refused(result, log):
                continue  # rolled back: self.step is the checkpoint's step again
            meter.add(self.tokens_per_step)
            monitor.record(ready_at, time.perf_counter() - step_start)
            lagging = monitor.check() if monitor.due(self.step) else None
            self._last_record = self._after_step(result, lr, meter, log, start, times, lagging)
            if self.stop.agreed():
                self._stop_for_signal(log)
                break

    def _target_tokens(self, batches: list[Batch]) -> dict[str, float]:
        """SFT: the step's supervised (assistant) tokens over the whole global batch, which is
        what its loss averages over (every micro-batch carries count x micro / global)."""
        denominator = batches[0].loss_denominator if batches else None
        if denominator is None:
            return {}
        t = self.cfg.training
        return {"target_tokens": round(denominator * t.global_batch_size / t.micro_batch_size)}

    def _refused(self, result: StepResult, log: MetricsLogger) -> bool:
        """React to an update the guard refused, as `training.on_nonfinite` says; True when
        the run rolled back to a checkpoint."""
        event = self.guard.event
        ranks = failing_ranks(result.local_loss)
        what = event.describe() if event else "refused update"
        where = f"on ranks {ranks}" if ranks else "in the global gradient norm"
        mode = self.cfg.training.on_nonfinite
        if mode == "abort":
            raise TrainingDiverged(
                f"step {self.step}: {what} {where}; training.on_nonfinite = abort. The update was "
                f"not applied; checkpoints in {self.checkpointer.folder} are from before it"
            )
        if mode == "skip":
            log.write(f"step {self.step}: {what} {where}: update skipped on every rank")
            return False
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise TrainingDiverged(
                f"step {self.step}: {what} {where} after {MAX_ROLLBACKS} rollbacks; giving up"
            )
        self.checkpointer.wait()
        path = self.checkpointer.newest_valid(report=log.write)
        if path is None:
            raise TrainingDiverged(
                f"step {self.step}: {what} {where}; training.on_nonfinite = rollback but "
                f"{self.checkpointer.folder} holds no checkpoint to roll back to"
            )
        bad = self.step
        self.load_checkpoint(path)
        self.state.skip_steps = sorted({*self.state.skip_steps, bad})
        log.write(
            f"step {bad}: {what} {where}: rolled back to {path} (step {self.step}); "
            f"the batch of step {bad} will be passed over"
        )
        return True

    def _stop_for_signal(self, log: MetricsLogger) -> None:
        """A stop signal reached some rank: make sure this step is checkpointed, then stop."""
        self.checkpointer.wait()
        path = ckpt.step_dir(self.checkpointer.folder, self.step)
        if not ckpt.is_complete(path):
            path = self.save_checkpoint(background=False)
        log.write(
            f"step {self.step}: {self.stop.name()} received: checkpoint {path} written; stopping "
            "(a restarted run resumes from it)"
        )

    def _logs(self, step: int) -> bool:
        t = self.cfg.training
        evaluates = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
        return step % self.cfg.metrics.log_every == 0 or evaluates or step == t.steps

    def _after_step(
        self,
        result: StepResult,
        lr: float,
        meter: Throughput,
        log: MetricsLogger,
        start: float,
        times: StepTimes,
        lagging: dict[str, Any] | None,
    ) -> dict[str, Any]:
        t = self.cfg.training
        step, last = self.step, self.step == t.steps
        record: dict[str, Any] = {}
        eval_now = t.eval_every > 0 and (step % t.eval_every == 0 or last)
        if self._logs(step) or lagging or result.skipped:
            # .item() waits for the device, so only logged steps pay for it.
            figures = meter.read()
            record = {
                "step": step,
                "loss": float(result.loss),
                "lr": lr,
                "grad_norm": float(result.grad_norm),
                **({"skipped": True} if result.skipped else {}),
                "tokens": step * self.tokens_per_step,
                **figures,
                "tokens_per_s_per_device": figures["tokens_per_s"] / self.runtime.world_size,
                **memory_stats(self.runtime.device),
                **times.read(),
                **(result.timings or {}),
                **self.engine.expert_metrics(),
                **{name: float(value) for name, value in (result.metrics or {}).items()},
                **self._targets,
                **self.train_loader.metrics(),
                **(self.replicas.metrics() if self.replicas is not None else {}),
                "elapsed_s": time.perf_counter() - start,
            }
            if lagging:
                record.update(lagging)
                for r in lagging["stragglers"]:
                    log.write(
                        f"step {step}: straggler: rank {r['rank']} on {r['host']} keeps the others "
                        f"waiting {r['lag_s']:.3f} s per step ({r['slowdown']:.0%} of the median "
                        f"step, {lagging['median_step_s']:.3f} s)"
                    )
            self._shown = (record["loss"], lr, record["tokens_per_s"])
            if eval_now:
                with meter.paused():
                    val_loss = self.evaluate()
                record["val_loss"] = val_loss
                if t.objective == "dpo":  # a pairwise loss: no perplexity; its accuracy instead
                    accuracy = self.val_metrics.get("val_reward_accuracy", math.nan)
                    shown = f"reward accuracy {accuracy:.3f}"
                else:
                    record["val_ppl"] = math.exp(min(val_loss, 50.0))
                    shown = f"ppl {record['val_ppl']:.1f}"
                record.update(self.val_metrics)
                log.write(f"step {step}: val_loss {val_loss:.4f} ({shown})")
            log.log(record)
        log.progress(step, *self._shown)
        if self.checkpointer.due(step, t.steps) or step == t.stop_at_step:
            saving = time.perf_counter()
            background = self.cfg.checkpoint.async_save and step not in (t.steps, t.stop_at_step)
            with meter.paused():
                path = self.save_checkpoint(background)
            times.add("time_checkpoint_s", time.perf_counter() - saving)
            log.write(f"step {step}: {'saving' if background else 'saved'} {path}")
        return record
