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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python bench/throughput.py`

from bench.common import environment, now, summarize, sync, table, write_result  # noqa: E402
from distrib.config import Config, load_config, to_dict  # noqa: E402
from distrib.data.prepare import prepare_dataset  # noqa: E402
from distrib.data.shards import MANIFEST_FILE, write_token_dataset  # noqa: E402
from distrib.errors import ConfigError  # noqa: E402
from distrib.metrics import flops_per_token, peak_tflops  # noqa: E402
from distrib.models.attention import resolve_backend  # noqa: E402
from distrib.models.llama import Transformer  # noqa: E402
from distrib.runtime import Runtime, init_runtime  # noqa: E402
from distrib.trainer import Trainer  # noqa: E402

CONTENDERS = ("distrib", "minimal", "hf")
TARGET_VS_MINIMAL = 0.97  # distrib must reach this fraction of the minimal loop's tokens/s

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

    seconds: float
    losses: list[float]  # every step's mean loss, warmup included
    peak_memory_gb: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


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


def timed(step: Callable[[], torch.Tensor], s: Setup) -> tuple[float, list[float]]:
    """Run warmup steps, then time `s.steps` steps (one device sync at each end)."""
    losses = [step() for _ in range(s.warmup)]
    start = now(s.device)
    losses += [step() for _ in range(s.steps)]
    seconds = now(s.device) - start
    return seconds, [float(x) for x in losses]


def run_distrib(s: Setup) -> Run:
    trainer = Trainer(s.cfg, s.runtime)
    engine, loader = trainer.engine, trainer.train_loader
    backend = resolve_backend(s.cfg.model.attention, s.device.type)
    seconds, losses = timed(lambda: engine.train_step(loader.next_step()).loss, s)
    return Run(seconds, losses, info={"attention": backend})


def build_transformer(s: Setup) -> Transformer:
    """Exactly what distrib's build_model does: meta, to_empty, seed, init_weights."""
    with torch.device("meta"):
        model = Transformer(s.cfg.model)
    model.to_empty(device=s.device)
    torch.manual_seed(s.cfg.training.seed)
    with torch.no_grad():
        model.init_weights()
    return model


def lr_lambda(t: Any) -> Callable[[int], float]:
    """Linear warmup, then cosine to min_lr over training.steps (distrib's default schedule)."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def run_minimal(s: Setup) -> Run:
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
    samples = stream.samples(s.warmup + s.steps).reshape(-1, t.global_batch_size)
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
    seconds, losses = timed(step, s)
    return Run(seconds, losses)


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


def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
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


def hf_trainer_class() -> type:
    """transformers.Trainer that keeps each micro-batch's (already step-scaled) loss tensor."""
    import transformers

    class LossKeepingTrainer(transformers.Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.micro_losses: list[torch.Tensor] = []

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            self.micro_losses.append(loss)  # a detached tensor: no sync
            return loss

    return LossKeepingTrainer


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
    clock = StepClock(device, (s.warmup, s.warmup + s.steps))
    trainer = hf_trainer_class()(
        model=build_hf_model(s), args=args, train_dataset=dataset, callbacks=[clock]
    )
    trainer.train()
    micro = [float(x) for x in trainer.micro_losses]
    losses = [sum(micro[i : i + s.accum]) for i in range(0, len(micro), s.accum)]
    opt = trainer.optimizer
    info = {
        "optimizer": f"{type(opt).__name__} ({args.optim})",
        "fused": opt.defaults.get("fused"),
        "foreach": opt.defaults.get("foreach"),
        "transformers": transformers.__version__,
    }
    return Run(clock.marks[s.warmup + s.steps] - clock.marks[s.warmup], losses, info=info)


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        return object
    return TrainerCallback


class StepClock(_callback_base()):  # type: ignore[misc]
    """Wall-clock (after a device sync) at the end of the given optimizer steps."""

    def __init__(self, device: torch.device, at_steps: tuple[int, ...]) -> None:
        self.device, self.at_steps = device, at_steps
        self.marks: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.at_steps:
            self.marks[state.global_step] = now(self.device)


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
    run = RUNNERS[name](s)
    run.info["threads_after"] = torch.get_num_threads()
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


def available(names: list[str]) -> list[str]:
    """Drop hf when transformers (or accelerate, which its Trainer needs) is missing."""
    if "hf" not in names:
        return names
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"skipping hf: {err}", flush=True)
        return [n for n in names if n != "hf"]
    return names


# --- report ------------------------------------------------------------------------------------


def figures(runs: list[Run], s: Setup, peak: float | None) -> dict[str, Any]:
    """Per-contender record: tokens/s of every repeat and their median, TFLOP/s, MFU."""
    rates = [s.steps * s.tokens_per_step / r.seconds for r in runs]
    tok_s = summarize(rates)
    tflops = tok_s["median"] * flops_per_token(s.cfg.model, s.cfg.data.seq_len) / 1e12
    memory = [r.peak_memory_gb for r in runs if r.peak_memory_gb is not None]
    return {
        "tokens_per_s": tok_s,
        "step_ms_median": 1e3 * s.tokens_per_step / tok_s["median"],
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gb": max(memory) if memory else None,
        "losses_first_repeat": runs[0].losses,
        "info": runs[0].info,
    }


def ratio_record(rows: dict[str, dict[str, Any]], runs: dict[str, list[Run]]) -> dict[str, Any]:
    """distrib / other, from the medians, and paired per repeat (same slot in the interleave)."""
    out: dict[str, Any] = {}
    for other in ("minimal", "hf"):
        if "distrib" not in rows or other not in rows:
            continue
        paired = [o.seconds / d.seconds for d, o in zip(runs["distrib"], runs[other], strict=True)]
        out[f"distrib/{other}"] = {
            "of_medians": rows["distrib"]["tokens_per_s"]["median"]
            / rows[other]["tokens_per_s"]["median"],
            "paired_per_repeat": paired,
        }
    return out


def targets(ratios: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if "distrib/minimal" in ratios:
        r = ratios["distrib/minimal"]["of_medians"]
        out["distrib >= 0.97x minimal loop"] = {"ratio": r, "pass": r >= TARGET_VS_MINIMAL}
    if "distrib/hf" in ratios:
        r = ratios["distrib/hf"]["of_medians"]
        out["distrib faster than HF Trainer"] = {"ratio": r, "pass": r > 1.0}
    return out


def loss_check(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Same weights and data: distrib and minimal agree at every step; HF at the first step
    (its warmup starts at lr 0 where distrib's starts at lr / warmup_steps)."""
    ref = rows.get("distrib", {}).get("losses_first_repeat")
    out: dict[str, Any] = {}
    if ref and "minimal" in rows:
        other = rows["minimal"]["losses_first_repeat"]
        out["minimal_max_abs_diff_all_steps"] = max(
            abs(a - b) for a, b in zip(ref, other, strict=True)
        )
    if ref and "hf" in rows:
        out["hf_abs_diff_first_step"] = abs(ref[0] - rows["hf"]["losses_first_repeat"][0])
    return out


def print_report(rows: dict[str, dict[str, Any]], record: dict[str, Any], cuda: bool) -> None:
    base = rows.get("distrib", {}).get("tokens_per_s", {}).get("median")
    header = ["contender", "tokens/s", "spread", "step ms", "vs distrib"]
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
        print(f"{name}: {target['ratio']:.3f} -> {'PASS' if target['pass'] else 'FAIL'}")
    print("loss check:", json.dumps(record["loss_check"]))


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    tmp = Path(tempfile.mkdtemp(prefix="distrib-bench-"))
    try:
        cfg = build_config(args, overrides, tmp)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    data = ensure_data(cfg, args.preset, args.warmup + args.steps)
    threads = args.threads or torch.get_num_threads()
    s = Setup(cfg, init_runtime(), args.warmup, args.steps, threads, str(tmp / "run"))
    names = available([n.strip() for n in args.contenders.split(",") if n.strip()])
    print(
        f"{s.device}, {threads} threads; {s.tokens_per_step} tokens/step "
        f"({cfg.training.global_batch_size} x {cfg.data.seq_len}, micro {cfg.training.micro_batch_size}); "
        f"{args.warmup} warmup + {args.steps} timed steps x {args.repeats} repeats; data {data}",
        flush=True,
    )
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:  # interleaved: A B C A B C ...
            start = time.perf_counter()
            run = run_one(name, s)
            runs[name].append(run)
            rate = args.steps * s.tokens_per_step / run.seconds
            print(
                f"  repeat {repeat + 1} {name:8s} {rate:10,.0f} tokens/s "
                f"(timed {run.seconds:.2f} s of {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    peak = peak_tflops(s.device, cfg.training.dtype, cfg.metrics.peak_tflops)
    rows = {n: figures(runs[n], s, peak) for n in names}
    ratios = ratio_record(rows, runs)
    record = {
        "environment": environment(s.device) | {"torch_threads": threads},
        "data": data,
        "preset": args.preset,
        "protocol": {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "interleaved": True,
            "tokens_per_step": s.tokens_per_step,
            "tokens_per_sequence": "seq_len inputs, each with its next-token label",
            "distrib_excludes": "logging, evaluation, checkpointing (not per-step costs)",
        },
        "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
        "peak_tflops": peak,
        "config": to_dict(cfg),
        "contenders": rows,
        "ratios": ratios,
        "targets": targets(ratios),
        "loss_check": loss_check(rows),
    }
    print_report(rows, record, s.device.type == "cuda")
    if not args.no_write:
        print(f"wrote {write_result('throughput', s.device, record)}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
