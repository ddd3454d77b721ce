"""The run configuration's sections: typed dataclasses whose field docs are the `--help` text.

A field whose type is a `Literal[...]` accepts only those values; `distrib.config.load` refuses
anything else with the nearest valid choice. Each component receives only its own section.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class JobConfig:
    run_dir: str = _f("runs/debug", "folder for checkpoints, metrics.jsonl, config and logs")
    description: str = _f("", "free text recorded with the run")
    overwrite: bool = _f(
        False,
        "start a fresh run in a run folder another run used: its files move to "
        "<run_dir>/previous/ (never deleted); needs checkpoint.resume = never or a path",
    )


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
    attention: Literal["auto", "flash", "sdpa", "cudnn", "eager"] = _f(
        "auto",
        "attention backend; auto picks flash where it runs (CUDA sm80+, bf16/fp16, head dim "
        "<= 256), else sdpa; cudnn is sdpa with cuDNN's kernel tried first (CUDA, bf16)",
    )
    init_std: float = _f(0.02, "standard deviation of the weight initialization")
    init_from: str = _f(
        "",
        "start from existing weights: 'hf:/path/to/folder' (a local Hugging Face folder of a "
        "supported architecture) or 'run:/path/to/run_dir[@STEP]' (a distrib run's newest or "
        "given checkpoint); its config sets the model keys and its tokenizer is data.tokenizer's "
        "default",
    )
    family: Literal["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "custom"] = _f(
        "llama",
        "architecture family: which Hugging Face class export writes and which of the keys "
        "below it can express; custom allows any combination and has no HF export",
    )
    head_dim: int = _f(0, "width of one attention head (0: dim / n_heads)")
    qkv_bias: bool = _f(False, "bias on the q, k and v projections (Qwen2)")
    qk_norm: bool = _f(False, "RMSNorm on each query and key head before RoPE (Qwen3)")
    sliding_window: int = _f(
        0, "attend only to the last N positions, this one included (Mistral; 0: all)"
    )
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = _f(
        "none",
        "RoPE scaling for a longer context: none; linear (positions divided by rope_factor); "
        "llama3 (Llama 3.1); yarn (YaRN, as transformers computes it)",
    )
    rope_factor: float = _f(8.0, "linear, llama3, yarn: how many times longer the context gets")
    rope_low_freq_factor: float = _f(1.0, "llama3: low-frequency boundary")
    rope_high_freq_factor: float = _f(4.0, "llama3: high-frequency boundary")
    rope_original_max_seq_len: int = _f(
        8192, "llama3, yarn: the context length the model was first trained on"
    )
    rope_beta_fast: float = _f(
        32.0, "yarn: frequencies turning more than this many times in the original context are kept"
    )
    rope_beta_slow: float = _f(
        1.0, "yarn: frequencies turning fewer times than this are divided by rope_factor"
    )
    rope_attention_factor: float = _f(
        0.0, "yarn: cos and sin are multiplied by this (0: 0.1 ln(rope_factor) + 1)"
    )
    moe_experts: int = _f(0, "routed experts per Mixture-of-Experts layer (0: dense SwiGLU)")
    moe_top_k: int = _f(2, "experts each token is sent to")
    moe_ffn_dim: int = _f(0, "hidden width of one expert's SwiGLU (0: ffn_dim)")
    moe_shared_experts: int = _f(
        0, "always-on shared experts per MoE layer, one SwiGLU of moe_shared_experts x moe_ffn_dim"
    )
    moe_dense_layers: int = _f(0, "the first N blocks keep the dense feed-forward (ffn_dim)")
    moe_score: Literal["softmax", "sigmoid"] = _f("softmax", "router score function")
    moe_norm_topk: bool = _f(True, "rescale each token's top-k expert weights to sum to one")
    moe_route_scale: float = _f(1.0, "multiply the routed experts' weights by this")
    moe_aux_loss_coef: float = _f(
        0.0, "weight of the load-balancing auxiliary loss (Switch / Mixtral style; 0: off)"
    )
    moe_z_loss_coef: float = _f(0.0, "weight of the router z-loss (ST-MoE; 0: off)")
    moe_bias_update_rate: float = _f(
        0.0,
        "auxiliary-loss-free balancing (DeepSeek-V3): per-step change of each expert's routing "
        "bias towards uniform load (0: off)",
    )
    moe_kernel: Literal["auto", "grouped_mm", "loop"] = _f(
        "auto",
        "expert matmuls: grouped_mm (torch._grouped_mm, CUDA sm90+ bf16), loop (one matmul per "
        "expert, any device); auto picks grouped_mm where it runs",
    )


@dataclass
class DataConfig:
    source: str = _f(
        "",
        "corpus: empty for the Python standard library's source, builtin:python-docs (its "
        "English documentation topics), a local .txt/.jsonl/.parquet file or folder, or a "
        "Hugging Face hub dataset name",
    )
    text_field: str = _f("text", "field holding the text in .jsonl/.parquet/hub records")
    text_sample_by: Literal["document", "paragraph", "line"] = _f(
        "document", "what one document is in .txt files"
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
    num_proc: int = _f(
        0, "distrib prepare: processes that tokenize (0: one per available core; 1: this one)"
    )
    streaming: bool = _f(
        False,
        "tokenize data.source while training, in a background thread, instead of reading a "
        "prepared data.dir (needs data.tokenizer); see docs/data.md",
    )
    format: Literal["text", "chat", "preference"] = _f(
        "text",
        "text: documents for pretraining; chat: conversations ('messages' of role/content) or "
        "'prompt'/'response' pairs, for training.objective = sft; preference: 'prompt'/"
        "'chosen'/'rejected' records, for training.objective = dpo. With an empty source, chat "
        "and preference use pairs made from the Python standard library's functions",
    )
    chat_template: str = _f(
        "auto",
        "how chat and preference records become text: auto (the tokenizer folder's chat "
        "template when it has one, else default), default (distrib's documented template), or "
        "a path to a Jinja template file",
    )
    packing: Literal["pack", "pad"] = _f(
        "pack",
        "chat: pack several examples into each sequence, each attending only to itself (RoPE "
        "then sees only offsets within the example), or pad each example to seq_len; "
        "preference data is always padded",
    )
    bad_records: Literal["skip", "error"] = _f(
        "skip",
        "chat and preference records with missing roles, empty responses or more than seq_len "
        "tokens: skip them (each reported with file and line) or stop with an error",
    )
    sources: list = field(  # type: ignore[type-arg]
        default_factory=list,
        metadata={
            "help": "a weighted mixture ([[data.sources]] tables in the TOML file: name, source, "
            "weight, text_field, max_epochs); replaces data.source. See docs/data.md"
        },
    )
    weight_schedule: list = field(  # type: ignore[type-arg]
        default_factory=list,
        metadata={
            "help": "mixture weights from given steps on ([[data.weight_schedule]] tables: step, "
            "weights = { NAME = W })"
        },
    )


@dataclass
class TrainingConfig:
    objective: Literal["pretrain", "sft", "dpo"] = _f(
        "pretrain",
        "pretrain: next-token loss on every token (data.format = text); sft: on the assistant "
        "tokens only (data.format = chat); dpo: direct preference optimization against the "
        "starting model (data.format = preference)",
    )
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
    schedule: Literal["cosine", "linear", "wsd", "constant"] = _f("cosine", "decay after warmup")
    decay_fraction: float = _f(0.2, "wsd only: fraction of steps spent in the final decay")
    weight_decay: float = _f(0.1, "AdamW weight decay (never applied to norms and biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "compute dtype (bfloat16 = autocast)")
    compile: bool = _f(False, "torch.compile each transformer block (and the loss)")
    loss_chunk_tokens: int = _f(
        0,
        "output layer + loss in chunks of this many tokens, recomputed in backward, so the "
        "[tokens x vocab] float32 logits never exist at once (0: in one piece)",
    )
    float8: bool = _f(False, "train the linear layers in float8 (needs torchao and a CUDA GPU)")
    eval_every: int = _f(50, "evaluate on the validation split every N steps (0: never)")
    eval_steps: int = _f(4, "validation batches (of global_batch_size) per evaluation")
    on_nonfinite: Literal["skip", "rollback", "abort"] = _f(
        "skip",
        "a NaN/Inf loss or grad norm on any rank: skip the update on all ranks, roll back to the "
        "last checkpoint and skip the batch, or abort with a report",
    )
    spike_threshold: float = _f(
        0.0, "treat a loss above this multiple of its running mean like a NaN (0: off)"
    )
    spike_window: int = _f(50, "steps in the running mean that spike_threshold compares against")
    optimizer: Literal["adamw", "sgd"] = _f(
        "adamw", "the (inner) optimizer: AdamW, or SGD with training.momentum (Nesterov)"
    )
    momentum: float = _f(0.0, "sgd only: momentum (0: plain SGD)")
    sync: Literal["every_step", "local_sgd", "diloco"] = _f(
        "every_step",
        "how fault-tolerant replica groups (parallel.fault_tolerance) agree: average gradients "
        "every step; local_sgd: average parameters every sync_every steps; diloco: an outer "
        "Nesterov step on the averaged change every sync_every steps",
    )
    sync_every: int = _f(8, "local_sgd / diloco: inner steps between synchronizations (H)")
    sync_delay: int = _f(
        0,
        "diloco: inner steps the average may take before it is applied, hiding the exchange "
        "behind computation (0: wait at once; up to sync_every - 1, about one round late)",
    )
    sync_merge: float = _f(
        0.5,
        "diloco with sync_delay: weight of the inner steps taken while the average was in flight, "
        "mixed into the outer step's result (0: dropped; Streaming DiLoCo's alpha)",
    )
    outer_lr: float = _f(0.7, "diloco: the outer optimizer's learning rate")
    outer_momentum: float = _f(0.9, "diloco: the outer optimizer's Nesterov momentum")


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, "replicated data-parallel degree (DDP; HSDP with dp_shard)")
    dp_shard: int = _f(1, "sharded data-parallel degree (FSDP2); -1 infers from the world size")
    tp: int = _f(1, "tensor-parallel degree")
    ep: int = _f(
        1,
        "expert-parallel degree: experts sharded over this many of the dp_shard ranks, tokens "
        "sent to them by all-to-all; divides dp_shard and model.moe_experts",
    )
    pp: int = _f(1, "pipeline-parallel degree")
    cp: int = _f(
        1,
        "context-parallel degree: each sequence split over this many ranks (load-balanced "
        "chunks), attention exchanging keys and values between them; divides data.seq_len / 2",
    )
    fault_tolerance: bool = _f(
        False,
        "dp_replicate replica groups, each its own torchrun job, join a torchft quorum each step: "
        "a lost group leaves the others training, and rejoins with a healthy peer's state",
    )
    min_replica_groups: int = _f(
        1, "fault_tolerance: the fewest replica groups that may commit a step"
    )
    ft_timeout_s: float = _f(
        60.0, "fault_tolerance: seconds before a collective or quorum call counts as failed"
    )
    cp_mode: Literal["ring", "alltoall"] = _f(
        "ring",
        "context parallelism's attention: ring (keys and values passed around the cp ranks, any "
        "head count) or alltoall (Ulysses: heads scattered, sequence gathered, the configured "
        "attention backend on whole sequences; needs cp to divide the heads per tp rank)",
    )
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = _f(
        "1f1b", "pipeline schedule"
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
    activation_checkpoint: Literal["none", "full", "selective", "memory_budget"] = _f(
        "none",
        "recompute activations in backward (memory_budget: the compiler picks, needs compile)",
    )
    activation_memory_budget: float = _f(
        0.5,
        "with activation_checkpoint = 'memory_budget': the share (0-1) of a compiled block's "
        "activations to keep; 0 recomputes all it can (like full), 1 as without checkpointing",
    )
    engine: Literal["native", "deepspeed"] = _f("native", "training engine")
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
    progress: bool = _f(
        True,
        "rank 0 shows a progress bar on a terminal, elsewhere (log file, tee, CI) a plain line "
        "every log_every steps",
    )
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
class LoraConfig:
    rank: int = _f(0, "LoRA rank of the adapters (0: off, every weight trains)")
    alpha: float = _f(16.0, "LoRA scaling numerator: adapters add (alpha / rank) * B A x")
    dropout: float = _f(0.0, "dropout on the adapters' input")
    targets: str = _f(
        "wq,wk,wv,wo",
        "comma-separated linear layers that get adapters: wq, wk, wv, wo (attention), w1, w2, "
        "w3 (feed-forward), output; or 'all' for every one but output",
    )
    base_dtype: Literal["float32", "bfloat16"] = _f(
        "float32", "dtype the frozen base weights are held in (adapters stay float32)"
    )


@dataclass
class DPOConfig:
    beta: float = _f(0.1, "DPO temperature: how far the policy may move from the reference")
    label_smoothing: float = _f(
        0.0, "assumed share of flipped preference labels (conservative DPO; 0: plain DPO)"
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
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


# Resolved once: with postponed annotations the dataclass field types are strings.
SECTIONS: dict[str, type] = typing.get_type_hints(Config)
HINTS: dict[str, dict[str, Any]] = {n: typing.get_type_hints(c) for n, c in SECTIONS.items()}


def choices(section: str, name: str) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` field accepts, or None for a free one."""
    hint = HINTS[section][name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def base_type(section: str, name: str) -> type:
    """The Python type of a field's values (a Literal's values share one type)."""
    options = choices(section, name)
    return type(options[0]) if options else HINTS[section][name]
