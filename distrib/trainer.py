"""Build the pieces of a run (`build_*`), then a short loop: step, measure, evaluate, checkpoint."""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib import checkpoint as ckpt
from distrib.config import Config, DataConfig, ModelConfig, to_dict
from distrib.data.loader import TokenLoader, build_loaders
from distrib.data.shards import TokenShards
from distrib.engine import Engine, NativeEngine, StepResult
from distrib.errors import ConfigError
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
    from distrib.parallel.dims import ParallelDims, dp_coordinate
    from distrib.parallel.init import materialize
    from distrib.parallel.parallelize import parallelize, uses_fsdp
    from distrib.parallel.tensor import loss_context

    dims = ParallelDims.from_config(cfg.parallel, runtime.world_size)
    mesh = dims.build_mesh(runtime.device.type) if runtime.world_size > 1 else None
    apply = functools.partial(
        parallelize, dims=dims, mesh=mesh, parallel=cfg.parallel, training=cfg.training
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
        self.checkpointer = ckpt.Checkpointer(cfg.checkpoint, self.run_dir)
        self.step = 0
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
        self._shown: tuple[float, float, float | None] = (math.nan, cfg.training.lr, None)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one stands."""
        return {
            **self.engine.state(),
            "train_loader": self.train_loader,
            "step": self.step,
            ckpt.rng_key(self.runtime.rank): rng_state(),
        }

    def resume(self) -> Path | None:
        """Load the checkpoint `checkpoint.resume` points at, if any."""
        path = self.checkpointer.resume_path()
        if path is None:
            return None
        state = self.checkpoint_state()
        ckpt.load(path, state)
        self.step = int(state["step"])
        key = ckpt.rng_key(self.runtime.rank)
        if isinstance(state.get(key), dict):
            set_rng_state(state[key])
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
        """Run from the current step to `training.steps`; returns the last logged record."""
        t, m = self.cfg.training, self.cfg.metrics
        resumed = self.resume()
        log = MetricsLogger(
            m, self.run_dir, self.runtime.is_main, t.steps, self.step, to_dict(self.cfg)
        )
        self._prepare_run_dir(log)
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
        try:
            last = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
            while self.step < last:
                step_start = time.perf_counter()
                batches = self.train_loader.next_step()
                self._debug_sleep()
                ready_at = time.time()  # wall clock: compared across ranks (see stragglers.py)
                times.add("time_data_s", time.perf_counter() - step_start)
                result = self.engine.train_step(batches, timed=self._logs(self.step + 1))
                lr = self.engine.lr()  # the rate this step used; the scheduler has moved on
                self.step += 1
                meter.add(self.tokens_per_step)
                monitor.record(ready_at, time.perf_counter() - step_start)
                lagging = monitor.check() if monitor.due(self.step) else None
                record = self._after_step(result, lr, meter, log, start, times, lagging)
        finally:
            log.close()
        return record

    def _logs(self, step: int) -> bool:
        t = self.cfg.training
        evaluates = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
        return step % self.cfg.metrics.log_every == 0 or evaluates or step == t.steps

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
        if self._logs(step) or lagging:
            # .item() waits for the device, so only logged steps pay for it.
            figures = meter.read()
            record = {
                "step": step,
                "loss": float(result.loss),
                "lr": lr,
                "grad_norm": float(result.grad_norm),
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
            with meter.paused():
                path = self.checkpointer.save(step, self.checkpoint_state())
            times.add("time_checkpoint_s", time.perf_counter() - saving)
            log.write(f"step {step}: saved {path}")
        return record
