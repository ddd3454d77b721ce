"""The three ways `bench/throughput.py` trains the same model: distrib's engine, a minimal
hand-written PyTorch loop, and Hugging Face's Trainer, with the setup and timing they share.

Legend: B batch, L sequence (seq_len), V vocabulary, G global batch (sequences per step).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import stamp, sync
from distrib.config import Config
from distrib.data.shards import MANIFEST_FILE
from distrib.models.attention import resolve_backend
from distrib.models.build import build_model
from distrib.models.hf import hf_config, to_hf_state_dict
from distrib.runtime import Runtime
from distrib.train.trainer import Trainer

# A step during which other processes used more than this share of one core is "disturbed".
FOREIGN_MAX = 0.05


@dataclass
class Setup:
    """What every contender shares."""

    cfg: Config
    runtime: Runtime
    warmup: int
    steps: int
    threads: int
    run_dir: str

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.training.global_batch_size * self.cfg.data.seq_len

    @property
    def accum(self) -> int:
        return self.cfg.training.global_batch_size // self.cfg.training.micro_batch_size


@dataclass
class Run:
    """One timed repeat of one contender."""

    marks: list[tuple[float, float | None]]  # `stamp()` at the end of warmup, then of each
    # timed step (CUDA: of the last only)
    losses: list[float]  # every step's mean loss, warmup included
    peak_memory_gb: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.marks[-1][0] - self.marks[0][0]

    @property
    def step_seconds(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]

    @property
    def foreign_share(self) -> list[float | None]:
        """Per interval: CPU other processes used, as a share of one core (None: unknown)."""
        return [
            None if a[1] is None or b[1] is None else (b[1] - a[1]) / max(b[0] - a[0], 1e-9)
            for a, b in zip(self.marks, self.marks[1:], strict=False)
        ]

    def clean_step_seconds(self) -> list[float]:
        """Step times not disturbed by other processes."""
        shares = self.foreign_share
        return [
            t
            for t, f in zip(self.step_seconds, shares, strict=True)
            if f is None or f < FOREIGN_MAX
        ]


# --- data shared by the minimal loop and HF ------------------------------------------------------


class TokenStream:
    """The train split as one numpy array (a memmap when it is one shard), and the distrib
    loader's sample order, recomputed here with numpy alone."""

    def __init__(self, data_dir: str, seq_len: int, global_batch: int, seed: int) -> None:
        manifest = json.loads((Path(data_dir) / MANIFEST_FILE).read_text())
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        maps = [
            np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r", shape=(s["num_tokens"],))
            for s in manifest["splits"]["train"]["shards"]
        ]
        # Several shards are concatenated in memory: fine at benchmark sizes.
        self.tokens = maps[0] if len(maps) == 1 else np.concatenate(maps)
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.num_samples = (len(self.tokens) - 1) // seq_len
        self._offsets = np.arange(seq_len + 1)

    def samples(self, num_steps: int) -> np.ndarray:
        """Sample ids of the first `num_steps` global batches, in order (epochs roll over)."""
        per_epoch = self.num_samples // self.global_batch
        out = []
        for epoch in range(math.ceil(num_steps / per_epoch)):
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            out.append(perm[: per_epoch * self.global_batch])
        return np.concatenate(out)[: num_steps * self.global_batch]

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """Windows of seq_len + 1 tokens, [len(samples), L + 1], one fancy index."""
        return self.tokens[samples[:, None] * self.seq_len + self._offsets]


# --- contenders ---------------------------------------------------------------------------------


def per_step_clock(device: torch.device) -> bool:
    """Read the clock after every step on CPU (free: steps run synchronously), but on CUDA only
    at both ends of the window, since a sync per step would stall the queue of kernels."""
    return device.type != "cuda"


def timed(step: Callable[[], torch.Tensor], s: Setup) -> tuple[list[Any], list[float]]:
    """Run warmup steps, then time `s.steps` steps; returns the clock stamps and all losses."""
    losses = [step() for _ in range(s.warmup)]
    marks = [stamp(s.device)]
    for i in range(s.steps):
        losses.append(step())
        if per_step_clock(s.device) or i == s.steps - 1:
            marks.append(stamp(s.device))
    return marks, [float(x) for x in losses]


def distrib_step(s: Setup) -> Callable[[], torch.Tensor]:
    """One step of `distrib train`'s loop, on the objects its Trainer builds."""
    trainer = Trainer(s.cfg, s.runtime)
    engine, loader = trainer.engine, trainer.train_loader
    return lambda: engine.train_step(loader.next_step()).loss


def run_distrib(s: Setup) -> Run:
    marks, losses = timed(distrib_step(s), s)
    return Run(
        marks, losses, info={"attention": resolve_backend(s.cfg.model.attention, s.device.type)}
    )


def build_transformer(s: Setup) -> nn.Module:
    """The model as distrib builds it (meta, to_empty, init keyed by the seed): same weights."""
    return build_model(s.cfg.model, s.device, s.cfg.training.seed)


def lr_lambda(t: Any) -> Callable[[int], float]:
    """Linear warmup, then cosine to min_lr over training.steps (distrib's default schedule)."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def minimal_step(s: Setup, num_steps: int) -> Callable[[], torch.Tensor]:
    """The hand-written loop's step, over the first `num_steps` global batches."""
    t, device, cuda = s.cfg.training, s.device, s.device.type == "cuda"
    model = build_transformer(s)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=cuda or None, foreach=not cuda
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    stream = TokenStream(s.cfg.data.dir, s.cfg.data.seq_len, t.global_batch_size, t.seed)
    samples = stream.samples(num_steps).reshape(-1, t.global_batch_size)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    step_index = iter(range(len(samples)))

    def step() -> torch.Tensor:
        rows_GL = torch.from_numpy(stream.rows(samples[next(step_index)]).astype(np.int64))
        if cuda:
            rows_GL = rows_GL.pin_memory().to(device, non_blocking=True)
        total = torch.zeros((), device=device)
        for chunk in rows_GL.split(t.micro_batch_size):
            with autocast:
                logits_BLV = model(chunk[:, :-1])
            loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), chunk[:, 1:].flatten())
            (loss / s.accum).backward()
            total += loss.detach()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return total / s.accum

    model.train()
    return step


def run_minimal(s: Setup) -> Run:
    marks, losses = timed(minimal_step(s, s.warmup + s.steps), s)
    return Run(marks, losses)


def paired_steps(s: Setup, n: int) -> dict[str, Any]:
    """distrib and the minimal loop side by side, alternating step by step (who goes first
    swaps each time), so load from other processes hits both alike; undisturbed steps only,
    when each has 3. A diagnostic for the distrib/minimal ratio on a shared machine; syncs
    after every step, also on CUDA."""
    steps = {"distrib": distrib_step(s), "minimal": minimal_step(s, s.warmup + n)}
    # One Run per step and contender: marks at its start and end.
    runs: dict[str, list[Run]] = {name: [] for name in steps}
    for i in range(s.warmup + n):
        for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
            start = stamp(s.device)
            steps[name]()
            if i >= s.warmup:
                runs[name].append(Run([start, stamp(s.device)], []))
    seconds = {name: [r.seconds for r in rs] for name, rs in runs.items()}
    clean = {name: [t for r in rs for t in r.clean_step_seconds()] for name, rs in runs.items()}
    use = clean if min(len(v) for v in clean.values()) >= 3 else seconds
    ms = {name: 1e3 * float(np.median(v)) for name, v in use.items()}
    return {
        "steps": n,
        "undisturbed_steps": {name: len(v) for name, v in clean.items()},
        "median_step_ms": ms,
        "distrib/minimal": ms["minimal"] / ms["distrib"],
        "step_seconds": seconds,
    }


def build_hf_model(s: Setup) -> torch.nn.Module:
    """LlamaForCausalLM with distrib's shapes, holding the same initial weights."""
    import transformers

    hf_cfg = hf_config(s.cfg.model, attn_implementation="sdpa")
    with torch.device(s.device):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    state = to_hf_state_dict(build_transformer(s).state_dict())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    return hf


class Windows(torch.utils.data.Dataset):
    """The same windows as the distrib loader, read lazily from the memmap per sample.

    `labels` are already shifted (position i holds token i + 1) and passed again as
    `shift_labels`, which tells HF's loss not to shift: seq_len inputs, seq_len labels.
    """

    def __init__(self, stream: TokenStream, samples: np.ndarray) -> None:
        self.stream, self.samples = stream, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(self.stream.rows(self.samples[i : i + 1])[0].astype(np.int64))
        return {"input_ids": row[:-1], "labels": row[1:], "shift_labels": row[1:]}


def hf_classes(device: torch.device, at_steps: range | tuple[int, int]) -> tuple[type, Any]:
    """A Trainer that keeps each micro-batch's loss tensor (no sync), and a callback that reads
    the clock (after a device sync) at the end of the optimizer steps `at_steps`."""
    import transformers

    # Class attributes are fresh per call: each run gets new classes.
    class LossKeepingTrainer(transformers.Trainer):
        micro_losses: list[torch.Tensor] = []

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)  # already scaled to the step
            self.micro_losses.append(loss)
            return loss

    class StepClock(transformers.TrainerCallback):
        marks: dict[int, tuple[float, float | None]] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in at_steps:
                self.marks[state.global_step] = stamp(device)

    return LossKeepingTrainer, StepClock()


def run_hf(s: Setup) -> Run:
    import transformers

    t, device = s.cfg.training, s.device
    stream = TokenStream(s.cfg.data.dir, s.cfg.data.seq_len, t.global_batch_size, t.seed)
    dataset = Windows(stream, stream.samples(s.warmup + s.steps))
    args = transformers.TrainingArguments(
        output_dir=s.run_dir,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=s.accum,
        max_steps=s.warmup + s.steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        adam_epsilon=t.eps,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_steps,
        train_sampling_strategy="sequential",  # the distrib loader's order, already shuffled
        remove_unused_columns=False,  # keep shift_labels
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device.type != "cuda",
        bf16=t.dtype == "bfloat16",
        seed=t.seed,
    )
    end = s.warmup + s.steps
    at_steps = range(s.warmup, end + 1) if per_step_clock(device) else (s.warmup, end)
    trainer_class, clock = hf_classes(device, at_steps)
    trainer = trainer_class(
        model=build_hf_model(s), args=args, train_dataset=dataset, callbacks=[clock]
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-run summary line
    trainer.train()
    micro = [float(x) for x in trainer.micro_losses]
    losses = [sum(micro[i : i + s.accum]) for i in range(0, len(micro), s.accum)]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    info = {
        "optimizer": f"{type(opt).__name__} ({args.optim})",
        "fused": opt.defaults.get("fused"),
        "foreach": opt.defaults.get("foreach"),
        "transformers": transformers.__version__,
    }
    return Run([clock.marks[n] for n in sorted(clock.marks)], losses, info=info)


RUNNERS: dict[str, Callable[[Setup], Run]] = {
    "distrib": run_distrib,
    "minimal": run_minimal,
    "hf": run_hf,
}


def run_one(name: str, s: Setup) -> Run:
    """One repeat of one contender, with the thread count pinned and memory released after."""
    torch.set_num_threads(s.threads)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    load_before = os.getloadavg()[0]
    run = RUNNERS[name](s)
    run.info |= {
        "threads_after": torch.get_num_threads(),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }
    if s.device.type == "cuda":
        run.peak_memory_gb = torch.cuda.max_memory_allocated(s.device) / 2**30
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    sync(s.device)
    return run
