"""Typed, nested run configuration: dataclass defaults < TOML file < `--section.key=value`.

Each component receives only its own section. Every field's one-line `help` is the `--help` text.
Anything wrong (unknown key, wrong type, impossible value) raises `ConfigError` naming the key and
what would be valid, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrib.errors import ConfigError
from distrib.validation import validate


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class JobConfig:
    run_dir: str = _f("runs/debug", "folder for checkpoints, metrics.jsonl, config and logs")
    description: str = _f("", "free text recorded with the run")


@dataclass
class ModelConfig:
    dim: int = _f(256, "model (residual stream) width")
    n_layers: int = _f(4, "number of transformer blocks")
    n_heads: int = _f(8, "query heads per attention layer")
    n_kv_heads: int = _f(4, "key/value heads (grouped-query attention); divides n_heads")
    ffn_dim: int = _f(768, "hidden width of the SwiGLU feed-forward")
    vocab_size: int = _f(4096, "embedding rows; at least the tokenizer's vocabulary")
    max_seq_len: int = _f(512, "longest sequence the RoPE tables cover")
    rope_theta: float = _f(10000.0, "RoPE base frequency")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _f(True, "share the input embedding and output projection")
    attention: str = _f(
        "auto", "attention backend; auto picks flash, then sdpa", ("auto", "flash", "sdpa", "eager")
    )
    init_std: float = _f(0.02, "standard deviation of the weight initialization")
    init_from: str = _f(
        "", "start from existing weights: 'hf:/path/to/folder' (a local Hugging Face Llama)"
    )


@dataclass
class DataConfig:
    source: str = _f(
        "",
        "corpus: empty for the Python standard library's source, a local .txt/.jsonl/.parquet "
        "file or folder, or a Hugging Face hub dataset name",
    )
    text_field: str = _f("text", "field holding the text in .jsonl/.parquet/hub records")
    text_sample_by: str = _f(
        "document", "what one document is in .txt files", ("document", "paragraph", "line")
    )
    hub_split: str = _f("train", "split to read from a hub dataset")
    tokenizer: str = _f(
        "", "empty to train a byte-level BPE, or a tokenizer.json file or HF tokenizer folder"
    )
    dir: str = _f("data/stdlib", "folder of the prepared dataset (shards, manifest, tokenizer)")
    seq_len: int = _f(256, "tokens per training sequence; at most model.max_seq_len")
    val_fraction: float = _f(0.05, "fraction of documents (files for the default corpus) held out")
    cross_document_attention: bool = _f(
        True, "false masks attention across document boundaries in packed sequences"
    )
    max_documents: int = _f(0, "stop reading the corpus after this many documents (0: all)")


@dataclass
class TrainingConfig:
    steps: int = _f(200, "optimizer steps to train")
    stop_at_step: int = _f(
        0, "save and stop after this step without changing the schedule (0: run to the end)"
    )
    seed: int = _f(1234, "seed for initialization and data order")
    global_batch_size: int = _f(16, "sequences per optimizer step, whatever the layout")
    micro_batch_size: int = _f(8, "sequences per forward pass on one data-parallel rank")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float = _f(3e-4, "learning rate at the end of the decay")
    warmup_steps: int = _f(20, "linear warmup steps from 0 to lr")
    schedule: str = _f("cosine", "decay after warmup", ("cosine", "linear", "wsd", "constant"))
    decay_fraction: float = _f(0.2, "wsd only: fraction of steps spent in the final decay")
    weight_decay: float = _f(0.1, "AdamW weight decay (never applied to norms and biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    dtype: str = _f("float32", "compute dtype (bfloat16 = autocast)", ("float32", "bfloat16"))
    compile: bool = _f(False, "torch.compile each transformer block (and the loss)")
    loss_chunk_tokens: int = _f(
        0,
        "output layer + loss in chunks of this many tokens, recomputed in backward, so the "
        "[tokens x vocab] float32 logits never exist at once (0: in one piece)",
    )
    float8: bool = _f(False, "train the linear layers in float8 (needs torchao and a CUDA GPU)")
    eval_every: int = _f(50, "evaluate on the validation split every N steps (0: never)")
    eval_steps: int = _f(4, "validation batches (of global_batch_size) per evaluation")
    on_nonfinite: str = _f(
        "skip",
        "a NaN/Inf loss or grad norm on any rank: skip the update on all ranks, roll back to the "
        "last checkpoint and skip the batch, or abort with a report",
        ("skip", "rollback", "abort"),
    )
    spike_threshold: float = _f(
        0.0, "treat a loss above this multiple of its running mean like a NaN (0: off)"
    )
    spike_window: int = _f(50, "steps in the running mean that spike_threshold compares against")


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, "replicated data-parallel degree (DDP; HSDP with dp_shard)")
    dp_shard: int = _f(1, "sharded data-parallel degree (FSDP2); -1 infers from the world size")
    tp: int = _f(1, "tensor-parallel degree")
    pp: int = _f(1, "pipeline-parallel degree")
    pp_schedule: str = _f(
        "1f1b", "pipeline schedule", ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
    )
    pp_stages_per_rank: int = _f(
        1, "pipeline stages per rank: 1 for gpipe/1f1b, >= 2 for interleaved_1f1b/zero_bubble"
    )
    pp_microbatches: int = _f(
        0, "pipeline micro-batches per training micro-batch (0: one per sequence)"
    )
    pp_split_points: str = _f(
        "", "first layer of every stage but the first, comma-separated, e.g. '4,8,12' (empty: even)"
    )
    loss_parallel: bool = _f(
        True, "with tp > 1, compute the loss on vocabulary-sharded logits without gathering them"
    )
    activation_checkpoint: str = _f(
        "none",
        "recompute activations in backward (memory_budget: the compiler picks, needs compile)",
        ("none", "full", "selective", "memory_budget"),
    )
    activation_memory_budget: float = _f(
        0.5,
        "with activation_checkpoint = 'memory_budget': the share (0-1) of a compiled block's "
        "activations to keep; 0 recomputes all it can (like full), 1 as without checkpointing",
    )
    engine: str = _f("native", "training engine", ("native", "deepspeed"))
    zero_stage: int = _f(2, "deepspeed only: ZeRO stage 0 (DDP), 1, 2 or 3")
    offload_optimizer: bool = _f(False, "deepspeed only: keep optimizer state on the CPU")
    offload_params: bool = _f(False, "deepspeed only (ZeRO-3): keep parameters on the CPU")
    deepspeed_config: str = _f(
        "", "deepspeed only: a DeepSpeed JSON whose values override the translated config"
    )


@dataclass
class CheckpointConfig:
    interval: int = _f(100, "save every N steps (0: only at the end)")
    keep: int = _f(3, "keep the newest N checkpoints (0: keep all)")
    resume: str = _f("auto", "auto (newest valid checkpoint), never, or a checkpoint path")
    async_save: bool = _f(
        False, "write checkpoints in the background while training goes on (key alias: async)"
    )
    verify: bool = _f(
        True, "check sizes and checksums of the checkpoint to resume from before loading it"
    )


@dataclass
class MetricsConfig:
    log_every: int = _f(10, "append to metrics.jsonl every N steps")
    progress: bool = _f(True, "show a progress bar on rank 0")
    tensorboard: bool = _f(False, "write TensorBoard events to <run_dir>/tensorboard")
    wandb: bool = _f(False, "log to Weights & Biases (needs the wandb extra)")
    peak_tflops: float = _f(0.0, "device peak TFLOP/s for MFU (0: look up the device)")
    straggler_every: int = _f(
        100, "compare all ranks' step timing every N steps (0: never; one gather of a few floats)"
    )
    straggler_threshold: float = _f(
        0.2, "report a rank that keeps the others waiting more than this fraction of a step"
    )
    wandb_project: str = _f("distrib", "W&B project name")
    wandb_run_name: str = _f("", "W&B run name (empty: the run folder's name)")


@dataclass
class DebugConfig:
    straggler_rank: int = _f(-1, "make this rank sleep every step, to test straggler reports")
    straggler_sleep_s: float = _f(0.0, "seconds that rank sleeps per step")
    nan_at_step: int = _f(
        0, "make the loss NaN at this step, to test training.on_nonfinite (0: off)"
    )
    nan_rank: int = _f(-1, "the rank whose loss nan_at_step poisons (-1: every rank)")
    record_samples: bool = _f(
        False, "append each step's sample ids to <run_dir>/samples/rank<R>.jsonl (data audits)"
    )


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# Resolved once: with postponed annotations the dataclass field types are strings.
SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_HINTS: dict[str, dict[str, type]] = {n: typing.get_type_hints(c) for n, c in SECTIONS.items()}


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}valid: {', '.join(options)}"


def _coerce(key: str, value: Any, kind: type, from_text: bool) -> Any:
    """Convert a TOML value (or a command-line string) to the field's type, or explain why not."""
    if from_text and isinstance(value, str):
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            if kind is int:
                return int(value)
            if kind is float:
                return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got '{value}'") from None
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# Keys whose natural name is a Python keyword.
_ALIASES = {"checkpoint.async": "checkpoint.async_save"}


def _set(cfg: Config, key: str, value: Any, from_text: bool) -> None:
    key = _ALIASES.get(key, key)
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown section '{section}' in '{key}': {_nearest(section, list(SECTIONS))}"
        )
    hints = _HINTS[section]
    if not name or name not in hints:
        options = [f"{section}.{n}" for n in hints]
        raise ConfigError(f"unknown key '{key}': {_nearest(key, options)}")
    obj = getattr(cfg, section)
    setattr(obj, name, _coerce(key, value, hints[name], from_text))


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--a.b=v` or `--a.b v` pairs from a command line; anything else is an error."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument '{arg}': overrides look like --section.key=value"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then command-line overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{path}: '{section}' must be a [section] table: {_nearest(section, list(SECTIONS))}"
                )
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value, from_text=False)
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value, from_text=True)
    _check_choices(cfg)
    validate(cfg)
    return cfg


def _check_choices(cfg: Config) -> None:
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            value = getattr(obj, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"{section}.{f.name} = '{value}' is not valid: {_nearest(str(value), list(choices))}"
                )


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (for config.json in the run folder and checkpoint manifests)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`, validated the same way as a TOML file."""
    cfg = Config()
    for section, values in data.items():
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, from_text=False)
    _check_choices(cfg)
    validate(cfg)
    return cfg


def help_lines() -> list[str]:
    """One line per key with its type, default and help, for `distrib train --help`."""
    lines = []
    defaults = Config()
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(defaults, section)):
            kind = _HINTS[section][f.name].__name__
            default = getattr(getattr(defaults, section), f.name)
            choices = f.metadata.get("choices")
            extra = f" ({'|'.join(choices)})" if choices else ""
            lines.append(
                f"  --{section}.{f.name} {kind} = {default!r}: {f.metadata['help']}{extra}"
            )
    return lines
