"""Build the pieces of a run (`build_*`), then a short loop: step, measure, evaluate, checkpoint."""

from __future__ import annotations

import functools
import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib import checkpoint as ckpt
from distrib.config import Config, DataConfig, ModelConfig, to_dict
from distrib.data.loader import Batch, TokenLoader, build_loaders
from distrib.data.shards import TokenShards
from distrib.engine import Engine, NativeEngine, StepResult
from distrib.errors import ConfigError, TrainingDiverged
from distrib.guard import LossGuard, failing_ranks
from distrib.metrics import (
    MetricsLogger,
    StepTimes,
    Throughput,
    flops_per_token,
    memory_stats,
    peak_tflops,
)
from distrib.models.llama import Transformer, num_params
from distrib.runtime import Runtime, rng_state, seed_everything, set_rng_state
from distrib.signals import StopRequest
from distrib.stragglers import StragglerMonitor


def check_dataset(data: DataConfig, model: ModelConfig) -> TokenShards:
    """Open the prepared training split and check the model can embed its vocabulary; runs
    before any process group or model exists, so a mismatch costs nothing."""
    shards = TokenShards.open(Path(data.dir), "train")
    if shards.vocab_size > model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({shards.vocab_size}) in {data.dir}: set model.vocab_size >= {shards.vocab_size}"
        )
    return shards


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> nn.Module:
    """The whole model for one process (generation, benchmarks): built on the meta device, then
    materialized on `device` and initialized. `build_engine` does the same with the layout
    applied in between, so each rank only ever allocates its own shard."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def build_engine(cfg: Config, runtime: Runtime) -> tuple[Engine, int, int]:
    """Build the model on meta, parallelize it as `cfg.parallel` says (whole, or cut into this
    rank's pipeline stages), materialize it and wrap it in the engine.

    Returns the engine and this rank's (data-parallel rank, data-parallel size).
    """
    if cfg.parallel.engine == "deepspeed":
        from distrib.deepspeed_engine import build_deepspeed_engine

        return build_deepspeed_engine(cfg, runtime)
    from distrib.parallel.dims import ParallelDims, dp_coordinate
    from distrib.parallel.init import materialize
    from distrib.parallel.parallelize import parallelize, uses_fsdp
    from distrib.parallel.tensor import loss_context

    dims = ParallelDims.from_config(cfg.parallel, runtime.world_size)
    mesh = dims.build_mesh(runtime.device.type) if runtime.world_size > 1 else None
    apply = functools.partial(
        parallelize,
        dims=dims,
        mesh=mesh,
        parallel=cfg.parallel,
        training=cfg.training,
        device=runtime.device,
    )
    loss_ctx = functools.partial(loss_context, dims.tp > 1 and cfg.parallel.loss_parallel)
    seed, pipeline = cfg.training.seed, None
    if dims.pp > 1:
        from distrib.parallel.pipeline import build_pipeline

        assert mesh is not None
        pipeline = build_pipeline(
            cfg.model,
            cfg.parallel,
            mesh["pp"],
            runtime.device,
            seed,
            cfg.training.micro_batch_size,
            apply,
            loss_ctx,
        )
        parts = list(pipeline.parts)
    else:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        apply(model)
        materialize(model, runtime.device, seed)
        parts = [model]
    if cfg.model.init_from:
        from distrib.models.hf import load_hf_weights

        load_hf_weights(parts, cfg.model.init_from.removeprefix("hf:"), cfg.model)
    engine = NativeEngine(
        parts,
        cfg.training,
        runtime.device,
        pipeline=pipeline,
        loss_context=loss_ctx,
        autocast=not uses_fsdp(dims),
        pp_group=mesh["pp"].get_group() if mesh is not None and dims.pp > 1 else None,
        num_loss_ranks=dims.dp * dims.tp,
    )
    dp_rank, dp_size = dp_coordinate(mesh) if mesh is not None else (0, 1)
    return engine, dp_rank, dp_size


def build_data(cfg: Config, dp_rank: int, dp_size: int) -> tuple[TokenLoader, TokenLoader]:
    return build_loaders(cfg.data, cfg.training, dp_rank, dp_size)


# More rollbacks than this in one run means the divergence is not one bad batch.
MAX_ROLLBACKS = 5


def _refuse(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """The `accept` of a step whose batch is passed over: compute it, apply nothing."""
    return False


class Trainer:
    """Holds the built pieces of one run and trains it; `train()` is the whole loop."""

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.run_dir = Path(cfg.job.run_dir)
        check_dataset(cfg.data, cfg.model)
        seed_everything(cfg.training.seed)
        self.engine, self.dp_rank, self.dp_size = build_engine(cfg, runtime)
        self.train_loader, self.val_loader = build_data(cfg, self.dp_rank, self.dp_size)
        info = {
            "engine": cfg.parallel.engine,
            "world_size": runtime.world_size,
            "layout": to_dict(cfg)["parallel"],
            "config": to_dict(cfg),
        }
        self.checkpointer = ckpt.Checkpointer(cfg.checkpoint, self.run_dir, info)
        self.step = 0
        # Steps whose batch is passed over after a rollback (training.on_nonfinite = rollback).
        self.skip_steps: list[int] = []
        self.rollbacks = 0
        self.guard = LossGuard(cfg.training.spike_threshold, cfg.training.spike_window)
        self.stop = StopRequest()
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
        # What the progress bar shows until the first logged step: no loss rather than "nan".
        self._shown: tuple[float | None, float, float | None] = (None, cfg.training.lr, None)

    def extra_state(self) -> dict[str, Any]:
        """What a resumed run needs beside the engine's state to continue exactly."""
        return {
            "train_loader": self.train_loader,
            "step": self.step,
            "skip_steps": list(self.skip_steps),
            ckpt.rng_key(self.runtime.rank): rng_state(),
        }

    def save_checkpoint(self, background: bool) -> Path:
        """Every rank together: the engine's state and `extra_state()` at the current step."""
        extra = self.extra_state()

        def write(folder: Path, bg: bool) -> Any:
            c = self.checkpointer
            return self.engine.save(folder, extra, bg, process_group=c.group, stager=c.stager)

        return self.checkpointer.save(self.step, write, background)

    def load_checkpoint(self, path: Path) -> None:
        """Restore engine, loader, step, skipped steps and this rank's RNG from `path`."""
        extra = self.extra_state()
        self.engine.load(path, extra)
        self.step = int(extra["step"])
        self.skip_steps = [int(s) for s in extra["skip_steps"]]
        key = ckpt.rng_key(self.runtime.rank)
        if isinstance(extra.get(key), dict):
            set_rng_state(extra[key])

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
        shutil.copyfile(Path(self.cfg.data.dir) / "tokenizer.json", self.run_dir / "tokenizer.json")
        cfg = self.cfg
        with torch.device("meta"):
            n = num_params(Transformer(cfg.model))
        log.write(
            f"model: {n / 1e6:.2f}M parameters, "
            f"{flops_per_token(cfg.model, cfg.data.seq_len) / 1e6:.1f} MFLOP/token; "
            f"{self.tokens_per_step} tokens/step in {self.train_loader.grad_accum_steps} "
            f"micro-batch(es) per rank; device {self.runtime.device}"
        )

    def evaluate(self) -> float:
        """Mean validation loss over the first `eval_steps` global batches of the split."""
        self.val_loader.reset()
        steps = min(self.cfg.training.eval_steps, self.val_loader.steps_per_epoch)
        losses = [self.engine.eval_loss(self.val_loader.next_step()) for _ in range(steps)]
        return float(torch.stack(losses).mean())

    def train(self) -> dict[str, Any]:
        """Run from the current step to `training.steps` (or a stop signal); returns the last
        logged record."""
        t, m = self.cfg.training, self.cfg.metrics
        notes: list[str] = []
        resumed = self.resume(notes.append)
        log = MetricsLogger(
            m, self.run_dir, self.runtime.is_main, t.steps, self.step, to_dict(self.cfg)
        )
        self._prepare_run_dir(log)
        for note in notes:
            log.write(note)
        if resumed is not None:
            log.write(f"resumed from {resumed} at step {self.step}")
        peak = peak_tflops(self.runtime.device, t.dtype, m.peak_tflops)
        meter = Throughput(
            # Per-device figures divide by every device, not just the data-parallel ones.
            flops_per_token(self.cfg.model, self.cfg.data.seq_len),
            self.runtime.world_size,
            peak,
        )
        monitor = StragglerMonitor(m.straggler_every, m.straggler_threshold, self.runtime.rank)
        times = StepTimes()
        record: dict[str, Any] = {}
        start = time.perf_counter()
        if threading.current_thread() is threading.main_thread():
            self.stop.install()
        try:
            last = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
            while self.step < last:
                step_start = time.perf_counter()
                batches = self.train_loader.next_step()
                self._record_samples(batches)
                self._debug_sleep()
                ready_at = time.time()  # wall clock: compared across ranks (see stragglers.py)
                times.add("time_data_s", time.perf_counter() - step_start)
                passed_over = self.step + 1 in self.skip_steps
                result = self.engine.train_step(
                    batches,
                    timed=self._logs(self.step + 1),
                    accept=_refuse if passed_over else self.guard,
                    poison=self._poisoned(self.step + 1),
                )
                lr = self.engine.lr()  # the rate this step used; the scheduler has moved on
                self.step += 1
                if passed_over:
                    log.write(f"step {self.step}: batch passed over (rolled back from it before)")
                elif result.skipped and self._refused(result, log):
                    continue  # rolled back: self.step is the checkpoint's step again
                meter.add(self.tokens_per_step)
                monitor.record(ready_at, time.perf_counter() - step_start)
                lagging = monitor.check() if monitor.due(self.step) else None
                record = self._after_step(result, lr, meter, log, start, times, lagging)
                if self.stop.agreed(self.runtime.device):
                    self._stop_for_signal(log)
                    break
            self.checkpointer.wait()
        finally:
            self.stop.uninstall()
            log.close()
        return record

    def _poisoned(self, step: int) -> bool:
        d = self.cfg.debug
        return d.nan_at_step == step and d.nan_rank in (-1, self.runtime.rank)

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
        self.skip_steps = sorted({*self.skip_steps, bad})
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

    def _record_samples(self, batches: list[Batch]) -> None:
        """With debug.record_samples, log which sequences this rank trains on at this step, so
        that a test can prove every sample is consumed exactly once across resumes."""
        if not self.cfg.debug.record_samples:
            return
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        ids = [int(i) for b in batches if b.sample_ids is not None for i in b.sample_ids]
        line = json.dumps({"step": self.step + 1, "samples": ids})
        with (folder / f"rank{self.runtime.rank}.jsonl").open("a") as f:
            f.write(line + "\n")

    def _debug_sleep(self) -> None:
        d = self.cfg.debug
        if d.straggler_sleep_s > 0 and self.runtime.rank == d.straggler_rank:
            time.sleep(d.straggler_sleep_s)

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
                record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                log.write(f"step {step}: val_loss {val_loss:.4f} (ppl {record['val_ppl']:.1f})")
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
