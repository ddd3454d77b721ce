"""Training throughput: distrib vs a minimal PyTorch loop vs the Hugging Face Trainer.

All three train the same Llama (same shapes, same initial weights) on the same token windows in
the same order: each sequence is `seq_len` input tokens, every one of them a label, so an
optimizer step is `global_batch_size x seq_len` tokens for every contender. Same AdamW
hyper-parameters, gradient clipping, micro-batch and accumulation. Each repeat builds every
contender afresh, runs `--warmup` untimed steps, then times `--steps` steps; repeats are
interleaved (A B C A B C ...) so drifts in machine load hit all alike, and medians are reported.

  distrib  `Trainer(cfg, init_runtime())` as `distrib train` builds it; times
           `engine.train_step(train_loader.next_step())`, the per-step work of its loop. Logging
           (one `.item()` every `log_every` steps), evaluation and checkpointing are left out:
           they are not per-step costs in steady state.
  minimal  the same `Transformer` built the same way, `torch.optim.AdamW` (foreach on CPU, fused
           on CUDA), `F.cross_entropy` on float32 logits, `clip_grad_norm_`, accumulation;
           batches gathered straight from the memmapped shards with numpy. No framework.
  hf       `transformers.LlamaForCausalLM` (sdpa) holding the same weights under
           `transformers.Trainer`, timed between `on_step_end` callbacks, so its data loading
           and per-step bookkeeping count as the others' do.

    python bench/throughput.py [--config C | --preset 1b] [--steps 10 --warmup 3 --repeats 3]
                               [--section.key=value ...]

Legend: B batch, L sequence (seq_len), V vocabulary, G global batch (sequences per step).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python bench/throughput.py`

from bench.common import environment, stamp, summarize, sync, table, write_result  # noqa: E402
from distrib.config import Config, load_config, to_dict  # noqa: E402
from distrib.data.prepare import prepare_dataset  # noqa: E402
from distrib.data.shards import MANIFEST_FILE, write_token_dataset  # noqa: E402
from distrib.errors import ConfigError  # noqa: E402
from distrib.metrics import flops_per_token, peak_tflops  # noqa: E402
from distrib.models.attention import resolve_backend  # noqa: E402
from distrib.runtime import Runtime, init_runtime  # noqa: E402
from distrib.trainer import Trainer, build_model  # noqa: E402

CONTENDERS = ("distrib", "minimal", "hf")
TARGET_VS_MINIMAL = 0.97  # distrib must reach this fraction of the minimal loop's tokens/s
# A step during which other processes used more than this share of one core is "disturbed".
FOREIGN_MAX = 0.05

# ~1B Llama (Llama 3.2 1B layout with a 32k vocabulary) for GPUs, on synthetic tokens.
PRESET_1B = [
    "--model.vocab_size=32000",
    "--model.max_seq_len=4096",
    "--data.seq_len=2048",
    "--data.tokenizer=",
    "--training.global_batch_size=16",
    "--training.micro_batch_size=4",
    "--training.dtype=bfloat16",
]


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


HF_TOP = {"tok_embeddings.": "model.embed_tokens.", "norm.": "model.norm.", "output.": "lm_head."}
HF_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def to_hf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """distrib names -> LlamaForCausalLM names; no q/k permutation (both use rotate_half)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):
            layer, _, rest = name.partition(".")[2].partition(".")
            module, _, leaf = rest.rpartition(".")
            name = f"model.layers.{layer}.{HF_LAYER[module]}.{leaf}"
        else:
            prefix = next(p for p in HF_TOP if name.startswith(p))
            name = HF_TOP[prefix] + name[len(prefix) :]
        out[name] = tensor
    return out


def build_hf_model(s: Setup) -> torch.nn.Module:
    """LlamaForCausalLM with distrib's shapes, holding the same initial weights."""
    import transformers

    m = s.cfg.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    with torch.device(s.device):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    state = to_hf_state(build_transformer(s))
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


# --- configuration and data --------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="TOML config (default configs/debug.toml)")
    p.add_argument("--preset", choices=("debug", "1b"), default="debug", help="1b: ~1B Llama")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per contender")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run"
    )
    p.add_argument(
        "--paired-steps",
        type=int,
        default=20,
        help="then distrib and minimal alternating step by step, N steps each (0: skip)",
    )
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args, overrides = p.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1 (warmup's end starts the clock)")
    return args, overrides


def build_config(args: argparse.Namespace, overrides: list[str], tmp: Path) -> Config:
    """The run's config: debug.toml (or --config), the 1b preset's shapes on synthetic data in
    `tmp`, then the command line's overrides."""
    if args.preset == "1b":
        path = args.config or ROOT / "configs" / "llama3_1b.toml"
        return load_config(path, [*PRESET_1B, f"--data.dir={tmp / 'synthetic'}", *overrides])
    return load_config(args.config or ROOT / "configs" / "debug.toml", overrides)


def write_synthetic(cfg: Config, num_steps: int) -> None:
    """Uniform random tokens (EOS about every 1000) through the real shard writer: enough for
    `num_steps` global batches without reuse, and one global batch of validation."""
    seq_len, g, vocab = cfg.data.seq_len, cfg.training.global_batch_size, cfg.model.vocab_size
    rng = np.random.default_rng(cfg.training.seed)
    eos = vocab - 1

    def stream(n: int) -> np.ndarray:
        tokens = rng.integers(0, vocab - 1, size=n, dtype=np.int64)
        tokens[rng.random(n) < 1e-3] = eos
        return tokens

    train = stream(num_steps * g * seq_len + 1)
    write_token_dataset(cfg.data.dir, {"train": train, "val": stream(g * seq_len + 1)}, vocab, eos)


def ensure_data(cfg: Config, preset: str, num_steps: int) -> str:
    """Make sure cfg.data.dir holds a prepared dataset; returns what the data is."""
    if preset == "1b":
        write_synthetic(cfg, num_steps)
        return "synthetic: uniform random tokens, written with distrib's shard writer"
    if not (Path(cfg.data.dir) / MANIFEST_FILE).is_file():
        print(f"no prepared dataset in {cfg.data.dir}: preparing it", flush=True)
        prepare_dataset(cfg.data, cfg.model.vocab_size, cfg.training.seed)
    manifest = json.loads((Path(cfg.data.dir) / MANIFEST_FILE).read_text())
    return f"{cfg.data.dir}: {manifest.get('source', '')}"


def hf_available() -> bool:
    """transformers and accelerate (which its Trainer needs) importable."""
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"skipping hf: {err}", flush=True)
        return False
    return True


# --- report ------------------------------------------------------------------------------------


def rate(run: Run, s: Setup) -> float:
    """A repeat's tokens/s. Where every step was clocked (CPU), from the median time of the
    steps no other process disturbed (of all steps if fewer than 3 were undisturbed); on a
    shared machine a burst of foreign load then cannot move it. Else from the whole window."""
    if len(run.marks) == s.steps + 1:
        clean = run.clean_step_seconds()
        return s.tokens_per_step / float(np.median(clean if len(clean) >= 3 else run.step_seconds))
    return s.steps * s.tokens_per_step / run.seconds


def figures(runs: list[Run], s: Setup, peak: float | None) -> dict[str, Any]:
    """Per-contender record: tokens/s of every repeat and their median, TFLOP/s, MFU."""
    tok_s = summarize([rate(r, s) for r in runs])
    window = summarize([s.steps * s.tokens_per_step / r.seconds for r in runs])
    tflops = tok_s["median"] * flops_per_token(s.cfg.model, s.cfg.data.seq_len) / 1e12
    memory = [r.peak_memory_gb for r in runs if r.peak_memory_gb is not None]
    return {
        "tokens_per_s": tok_s,
        "tokens_per_s_whole_window": window,
        "step_seconds": [r.step_seconds for r in runs],
        "foreign_cpu_share": [r.foreign_share for r in runs],
        "undisturbed_steps": [len(r.clean_step_seconds()) for r in runs],
        "step_ms_median": 1e3 * s.tokens_per_step / tok_s["median"],
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gb": max(memory) if memory else None,
        "losses_first_repeat": runs[0].losses,
        "info": runs[0].info,
        "load_avg_1min": [r.info["load_avg_1min"] for r in runs],
    }


def compare(
    rows: dict[str, dict[str, Any]], runs: dict[str, list[Run]], s: Setup
) -> dict[str, Any]:
    """distrib / other (of the medians, and paired per repeat: same slot of the interleave), the
    targets, and the loss check: from the same weights and data, distrib and minimal agree at
    every step, HF at the first (its warmup starts at lr 0, distrib's at lr / warmup_steps)."""
    out: dict[str, Any] = {"ratios": {}, "targets": {}, "loss_check": {}}
    goals = {
        "minimal": ("distrib >= 0.97x minimal loop", TARGET_VS_MINIMAL),
        "hf": ("distrib faster than HF Trainer", 1.0 + 1e-12),
    }
    for other, (goal, threshold) in goals.items():
        if "distrib" not in rows or other not in rows:
            continue
        r = rows["distrib"]["tokens_per_s"]["median"] / rows[other]["tokens_per_s"]["median"]
        paired = [
            rate(d, s) / rate(o, s) for d, o in zip(runs["distrib"], runs[other], strict=True)
        ]
        out["ratios"][f"distrib/{other}"] = {"of_medians": r, "paired_per_repeat": paired}
        # On CPU a figure is trusted when most repeats had >= 3 steps nothing else disturbed.
        trusted = all(
            2 * sum(n >= 3 for n in rows[c]["undisturbed_steps"]) >= len(runs[c])
            for c in ("distrib", other)
        )
        conclusive = s.device.type == "cuda" or trusted
        out["targets"][goal] = {"ratio": r, "pass": r >= threshold, "conclusive": conclusive}
        ours, theirs = rows["distrib"]["losses_first_repeat"], rows[other]["losses_first_repeat"]
        n = len(ours) if other == "minimal" else 1
        out["loss_check"][f"{other}_max_abs_diff_first_{n}_steps"] = max(
            abs(a - b) for a, b in zip(ours[:n], theirs[:n], strict=True)
        )
    return out


def print_report(record: dict[str, Any], cuda: bool) -> None:
    rows = record["contenders"]
    base = rows.get("distrib", {}).get("tokens_per_s", {}).get("median")
    header = ["contender", "tokens/s", "spread", "step ms", "distrib / it"]
    header += ["TFLOP/s", "MFU", "mem GB"] if cuda else []
    lines = [header]
    for name, row in rows.items():
        med = row["tokens_per_s"]["median"]
        line = [
            name,
            f"{med:,.0f}",
            f"{100 * row['tokens_per_s']['spread']:.1f}%",
            f"{row['step_ms_median']:.1f}",
            f"{base / med:.3f}x" if base else "-",
        ]
        if cuda:
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            line += [f"{row['tflops']:.1f}", mfu, f"{row['peak_memory_gb'] or 0:.1f}"]
        lines.append(line)
    print(table(lines))
    for name, target in record["targets"].items():
        caveat = "" if target["conclusive"] else " (inconclusive: other processes loaded the CPU)"
        print(f"{name}: {target['ratio']:.3f} -> {'PASS' if target['pass'] else 'FAIL'}{caveat}")
    paired = record["paired_steps"]
    if paired:
        ms = paired["median_step_ms"]
        print(
            f"paired steps ({paired['steps']} each, alternating): distrib {ms['distrib']:.1f} ms, "
            f"minimal {ms['minimal']:.1f} ms per step -> distrib/minimal "
            f"{paired['distrib/minimal']:.3f} (undisturbed steps: {paired['undisturbed_steps']})"
        )
    print("loss check:", json.dumps(record["loss_check"]))


def measure(args: argparse.Namespace, s: Setup, names: list[str]) -> dict[str, Any]:
    """Every repeat of every contender, interleaved, then the paired distrib/minimal steps."""
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:  # A B C A B C ...
            start = time.perf_counter()
            runs[name].append(run := run_one(name, s))
            clean = len(run.clean_step_seconds()) if len(run.marks) > 2 else "-"
            print(
                f"  repeat {repeat + 1} {name:8s} {rate(run, s):10,.0f} tokens/s "
                f"(timed {run.seconds:.2f} s of {time.perf_counter() - start:.1f} s; "
                f"{clean}/{args.steps} steps undisturbed)",
                flush=True,
            )
    paired = None
    if args.paired_steps and {"distrib", "minimal"} <= set(names):
        paired = paired_steps(s, args.paired_steps)
        gc.collect()
    peak = peak_tflops(s.device, s.cfg.training.dtype, s.cfg.metrics.peak_tflops)
    rows = {n: figures(runs[n], s, peak) for n in names}
    return {
        "flops_per_token": flops_per_token(s.cfg.model, s.cfg.data.seq_len),
        "peak_tflops": peak,
        "contenders": rows,
        **compare(rows, runs, s),
        "paired_steps": paired,
    }


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    tmp = Path(tempfile.mkdtemp(prefix="distrib-bench-"))
    try:
        cfg = build_config(args, overrides, tmp)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        data = ensure_data(cfg, args.preset, args.warmup + max(args.steps, args.paired_steps))
        threads = args.threads or torch.get_num_threads()
        s = Setup(cfg, init_runtime(), args.warmup, args.steps, threads, str(tmp / "run"))
        names = [n for n in args.contenders.split(",") if n in RUNNERS]
        names = [n for n in names if n != "hf" or hf_available()]
        t = cfg.training
        print(
            f"{s.device}, {threads} threads; {s.tokens_per_step} tokens/step ({t.global_batch_size}"
            f" x {cfg.data.seq_len}, micro {t.micro_batch_size}); {args.warmup} warmup + "
            f"{args.steps} timed steps x {args.repeats} repeats; data {data}",
            flush=True,
        )
        protocol = {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "interleaved": True,
            "tokens_per_step": s.tokens_per_step,
            "tokens_per_sequence": "seq_len inputs, each with its next-token label",
            "distrib_excludes": "logging, evaluation, checkpointing (not per-step costs)",
            "tokens_per_s": "per repeat: CPU tokens/step / median time of the steps during "
            f"which other processes used < {FOREIGN_MAX:.0%} of a core; CUDA whole window",
        }
        record = {
            "environment": environment(s.device) | {"torch_threads": threads},
            "data": data,
            "preset": args.preset,
            "protocol": protocol,
            "config": to_dict(cfg),
            **measure(args, s, names),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(record, s.device.type == "cuda")
    if not args.no_write:
        print(f"wrote {write_result('throughput', s.device, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
