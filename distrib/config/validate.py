"""The checks of a whole config: values that cannot work, alone or together.

`distrib.config.load` parses (unknown keys, types, choices) and calls `validate` on every config
it builds; what can be checked without knowing the world size is checked here, before any
process group starts (`ParallelDims` checks the rest). Rules that a builder applies too live in
`distrib.config.rules`, and are only called from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from distrib.config import families, rules
from distrib.config.mixture import parse_schedule, parse_sources
from distrib.config.replica_rules import validate_replicas
from distrib.config.sections import (
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
    base_type,
)
from distrib.errors import ConfigError

# The process count each launcher exports: torchrun (and accelerate), an `srun` step, and the MPI
# flavours of `distrib.launchers.mpi`. Read here as plain variables: `detect_launch` may ask
# scontrol or MPI, so it runs once, in `distrib train`, after the config is loaded.
_LAUNCH_SIZE_VARS = (
    "WORLD_SIZE",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "PMIX_SIZE",
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Reject impossible values; messages name the key and what would be valid. (Unknown keys
    and choices outside a field's `Literal` are refused by `distrib.config.load` itself.)"""
    m, d, t, p = cfg.model, cfg.data, cfg.training, cfg.parallel
    _validate_finite(cfg)
    _validate_model(m)
    _validate_data(d, m)
    _validate_training(t)
    validate_replicas(cfg)  # before the layout's own rules: dp_replicate counts groups here
    _validate_parallel(p, m, d, t)
    _validate_compute(t, p)
    _check(
        not (p.engine == "deepspeed" and cfg.checkpoint.async_save),
        "checkpoint.async = true is not supported with parallel.engine = 'deepspeed' "
        "(DeepSpeed's save_checkpoint has no background mode); set checkpoint.async = false",
    )
    if p.dp_replicate > 0 and p.dp_shard > 0 and _fits_launch(p):
        # Without a launch, the batch is checked against the layout's own world size. A layout
        # that does not fit the launch is left to `distrib train` (`cli._check_layout`), which
        # reports the world size first: checked here, the mismatch would be blamed on the batch.
        rules.grad_accum_steps(t, p.dp_replicate * p.dp_shard)
    _validate_run(cfg)
    _validate_objective(cfg)
    _validate_lora(cfg)


def _fits_launch(p: ParallelConfig) -> bool:
    """False when a launcher (torchrun, srun, mpirun) exported a world size that the degrees
    do not multiply to, or might not (one is inferred); True without a launcher."""
    sizes = {os.environ[key] for key in _LAUNCH_SIZE_VARS if key in os.environ}
    if not sizes:
        return True
    # Each fault-tolerant replica group is a launch of its own: dp_replicate counts them.
    replicate = 1 if p.fault_tolerance else p.dp_replicate
    degrees = (replicate, p.dp_shard, p.cp, p.tp, p.pp)
    return -1 not in degrees and sizes == {str(math.prod(degrees))}


def _validate_finite(cfg: Config) -> None:
    """Every float key of every section is a finite number: `training.lr = inf` would turn
    every weight non-finite at the first update, and a NaN fails a range check only by accident,
    with a message about something else.
    No float key uses inf or NaN as a sentinel (the "off" or "look it up" value is 0 where there
    is one: max_grad_norm, spike_threshold, peak_tflops), so there are no exceptions."""
    for section, kind in SECTIONS.items():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(kind):
            if base_type(section, f.name) is not float:
                continue
            value = getattr(obj, f.name)
            _check(math.isfinite(value), f"{section}.{f.name} must be a finite number, got {value}")


def _validate_model(m: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        _check(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _check(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads}); "
        f"valid n_kv_heads: {[k for k in range(1, m.n_heads + 1) if m.n_heads % k == 0]}",
    )
    families.check_model_options(m)  # head dim, sliding window, RoPE scaling factors
    _validate_moe(m)
    families.check_family(m)
    _check(m.rope_theta > 0 and m.norm_eps > 0, "model.rope_theta and model.norm_eps must be > 0")
    _check(
        m.init_from == "" or m.init_from.startswith(("hf:", "run:")),
        f"model.init_from = '{m.init_from}': expected 'hf:/path/to/folder', "
        "'run:/path/to/run_dir[@STEP]' or empty",
    )


def _validate_moe(m: ModelConfig) -> None:
    """The Mixture-of-Experts keys: checked only where moe_experts > 0 turns them on."""
    _check(m.moe_experts >= 0, f"model.moe_experts must be >= 0 (0: dense), got {m.moe_experts}")
    if m.moe_experts == 0:
        return
    _check(
        1 <= m.moe_top_k <= m.moe_experts,
        f"model.moe_top_k must be between 1 and model.moe_experts ({m.moe_experts}), "
        f"got {m.moe_top_k}",
    )
    for key in ("moe_ffn_dim", "moe_shared_experts"):
        _check(getattr(m, key) >= 0, f"model.{key} must be >= 0, got {getattr(m, key)}")
    _check(
        0 <= m.moe_dense_layers < m.n_layers,
        f"model.moe_dense_layers must be in [0, model.n_layers = {m.n_layers}) so that some "
        f"block has experts, got {m.moe_dense_layers}",
    )
    for key in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
        _check(getattr(m, key) >= 0, f"model.{key} must be >= 0 (0: off), got {getattr(m, key)}")
    _check(m.moe_route_scale > 0, f"model.moe_route_scale must be > 0, got {m.moe_route_scale}")


def _validate_expert_parallel(p: ParallelConfig, m: ModelConfig) -> None:
    """Expert parallelism: degrees that can be checked before the world size is known."""
    _check(p.ep >= 1, f"parallel.ep must be >= 1, got {p.ep}")
    if p.ep == 1:
        return
    _check(
        m.moe_experts > 0,
        f"parallel.ep = {p.ep} needs a Mixture-of-Experts model: set model.moe_experts "
        "(a multiple of ep) or parallel.ep = 1",
    )
    _check(
        m.moe_experts % p.ep == 0,
        f"parallel.ep ({p.ep}) must divide model.moe_experts ({m.moe_experts}); valid ep: "
        f"{[e for e in range(1, m.moe_experts + 1) if m.moe_experts % e == 0]}",
    )
    _check(
        p.engine == "native",
        "parallel.ep > 1 needs parallel.engine = 'native' (DeepSpeed runs MoE layers "
        "without expert parallelism)",
    )
    _check(
        p.dp_shard == -1 or p.dp_shard % p.ep == 0,
        f"parallel.ep ({p.ep}) must divide parallel.dp_shard ({p.dp_shard}): expert parallelism "
        "borrows its ranks from the sharded data-parallel ones; valid ep: "
        f"{[e for e in range(1, p.dp_shard + 1) if p.dp_shard % e == 0]}",
    )


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    _check(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    _check(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); "
        f"lower data.seq_len or raise model.max_seq_len",
    )
    _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _check(d.max_documents >= 0, f"data.max_documents must be >= 0, got {d.max_documents}")
    _check(d.num_proc >= 0, f"data.num_proc must be >= 0 (0: every core), got {d.num_proc}")
    _validate_mixture(d)
    _validate_streaming(d)


def _validate_streaming(d: DataConfig) -> None:
    if not d.streaming:
        return
    _check(
        bool(d.tokenizer),
        "data.streaming needs data.tokenizer (a tokenizer.json or an HF tokenizer folder): a "
        "stream cannot train one; `distrib prepare` on a sample of the corpus makes one",
    )
    _check(
        d.format == "text" and not d.sources,
        "data.streaming reads one text corpus: not with data.format = chat/preference or "
        "data.sources",
    )


def _validate_mixture(d: DataConfig) -> None:
    sources = parse_sources(d.sources)
    if not sources:
        _check(not d.weight_schedule, "data.weight_schedule needs a mixture: set data.sources")
        return
    parse_schedule(d.weight_schedule, [s.name for s in sources])
    _check(
        d.source == "",
        f"data.source = '{d.source}' and data.sources are both set: a mixture names each "
        "corpus in its [[data.sources]] entry; leave data.source empty",
    )
    _check(
        d.format == "text",
        f"data.sources mixes text corpora for pretraining; data.format = {d.format} is not "
        "supported in a mixture",
    )


def _validate_training(t: TrainingConfig) -> None:
    _check(t.steps > 0, f"training.steps must be positive, got {t.steps}")
    _check(t.stop_at_step >= 0, f"training.stop_at_step must be >= 0, got {t.stop_at_step}")
    for key in ("micro_batch_size", "global_batch_size", "spike_window"):
        _check(getattr(t, key) > 0, f"training.{key} must be positive, got {getattr(t, key)}")
    _check(
        t.lr > 0 and 0 <= t.min_lr <= t.lr,
        f"need 0 <= training.min_lr ({t.min_lr}) <= training.lr ({t.lr}) and lr > 0",
    )
    _check(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(
        0.0 < t.decay_fraction <= 1.0,
        f"training.decay_fraction must be in (0, 1], got {t.decay_fraction}",
    )
    _check(
        t.weight_decay >= 0 and t.max_grad_norm >= 0,
        "training.weight_decay and training.max_grad_norm must be >= 0",
    )
    _check(
        0 <= t.beta1 < 1 and 0 <= t.beta2 < 1 and t.eps > 0,
        "training.beta1/beta2 must be in [0, 1) and eps > 0",
    )
    _check(
        t.eval_every >= 0 and t.eval_steps > 0,
        "training.eval_every must be >= 0 and training.eval_steps > 0",
    )
    _check(
        t.spike_threshold == 0 or t.spike_threshold > 1,
        f"training.spike_threshold must be 0 (off) or > 1, got {t.spike_threshold}",
    )


def _validate_run(cfg: Config) -> None:
    """Checkpoints, metrics and the debug switches."""
    c = cfg.checkpoint
    _check(c.interval >= 0 and c.keep >= 0, "checkpoint.interval and checkpoint.keep must be >= 0")
    _check(c.resume != "", "checkpoint.resume must be auto, never, or a checkpoint path")
    _check(
        c.resume in ("auto", "never") or Path(c.resume).is_dir(),
        f"checkpoint.resume = {c.resume}: no such checkpoint folder; use auto, never, or the path "
        "of a step-NNNNNNNN folder",
    )
    # With auto, a requeued job would move its own progress aside and start over at each start.
    _check(
        not (cfg.job.overwrite and c.resume == "auto"),
        "job.overwrite = true starts a fresh run, which needs checkpoint.resume = never (or a "
        "checkpoint path to start from); with resume = auto the folder's run is continued",
    )
    _check(
        cfg.metrics.log_every > 0,
        f"metrics.log_every must be positive, got {cfg.metrics.log_every}",
    )
    _check(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops must be >= 0")
    _check(
        cfg.metrics.straggler_every >= 0 and cfg.metrics.straggler_threshold > 0,
        "metrics.straggler_every must be >= 0 and metrics.straggler_threshold > 0",
    )
    _check(cfg.debug.straggler_sleep_s >= 0, "debug.straggler_sleep_s must be >= 0")
    _check(cfg.debug.nan_at_step >= 0, "debug.nan_at_step must be >= 0 (0: off)")


def _validate_parallel(p: ParallelConfig, m: ModelConfig, d: DataConfig, t: TrainingConfig) -> None:
    """What can be checked without knowing the world size (ParallelDims checks the rest)."""
    degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp}
    for key, value in degrees.items():
        _check(
            value == -1 or value > 0, f"parallel.{key} must be positive or -1 (infer), got {value}"
        )
    _check(
        list(degrees.values()).count(-1) <= 1,
        "at most one of parallel.dp_replicate, dp_shard, tp, pp may be -1 (inferred)",
    )
    _validate_deepspeed(p)
    _validate_expert_parallel(p, m)
    if p.tp > 1:
        for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            value = getattr(m, key)
            _check(
                value % p.tp == 0,
                f"parallel.tp ({p.tp}) must divide model.{key} ({value}); valid tp: "
                f"{[t for t in range(1, value + 1) if value % t == 0 and m.n_kv_heads % t == 0][:8]}",
            )
    rules.check_tied_embeddings(m, p.tp, p.pp)
    _validate_pipeline(p, m, d, t)
    _validate_context_parallel(p, m, d)


def _validate_context_parallel(p: ParallelConfig, m: ModelConfig, d: DataConfig) -> None:
    _check(p.cp >= 1, f"parallel.cp must be >= 1, got {p.cp}")
    if p.cp == 1:
        return
    _check(
        d.seq_len % (2 * p.cp) == 0,
        f"parallel.cp = {p.cp} cuts each sequence into 2 x cp = {2 * p.cp} equal chunks (an "
        f"early and a late one per rank, so causal attention costs every rank the same): "
        f"data.seq_len ({d.seq_len}) must be a multiple of {2 * p.cp}; valid cp: "
        f"{[c for c in range(1, d.seq_len // 2 + 1) if d.seq_len % (2 * c) == 0][:8]}",
    )
    _check(
        p.ep == 1,
        f"parallel.cp ({p.cp}) with parallel.ep ({p.ep}) is not supported yet: set one to 1",
    )
    if p.cp_mode == "alltoall":
        heads = m.n_heads // max(p.tp, 1)
        _check(
            heads % p.cp == 0,
            f"parallel.cp_mode = 'alltoall' scatters each tensor-parallel rank's {heads} query "
            f"heads (model.n_heads {m.n_heads} / parallel.tp {p.tp}) over parallel.cp = "
            f"{p.cp} ranks, which must divide them; use parallel.cp_mode = 'ring' or cp in "
            f"{[c for c in range(1, heads + 1) if heads % c == 0]}",
        )


def _validate_compute(t: TrainingConfig, p: ParallelConfig) -> None:
    rules.check_activation_checkpoint(
        p.activation_checkpoint, p.activation_memory_budget, t.compile
    )
    _check(
        t.loss_chunk_tokens >= 0,
        f"training.loss_chunk_tokens must be >= 0, got {t.loss_chunk_tokens}",
    )
    _check(
        t.loss_chunk_tokens == 0 or (p.tp == 1 and p.pp == 1),
        "training.loss_chunk_tokens > 0 needs parallel.tp = 1 and parallel.pp = 1 (with tp the "
        "vocabulary-parallel loss already keeps logits sharded; a pipeline's last stage computes "
        "its loss from whole logits); set training.loss_chunk_tokens = 0",
    )
    _check(
        t.loss_chunk_tokens == 0 or p.engine == "native" or p.zero_stage < 3,
        "training.loss_chunk_tokens > 0 cannot run under DeepSpeed ZeRO-3 (the chunked head "
        "reads the output weight, which ZeRO-3 gathers only around the output layer's own "
        "forward); use parallel.zero_stage <= 2, the native engine, or loss_chunk_tokens = 0",
    )
    if t.float8:
        rules.check_float8(p.engine, p.tp)


def _validate_deepspeed(p: ParallelConfig) -> None:
    _check(
        p.zero_stage in (0, 1, 2, 3),
        f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}",
    )
    if p.engine != "deepspeed":
        for key in ("offload_optimizer", "offload_params"):
            _check(
                not getattr(p, key),
                f"parallel.{key} = true needs parallel.engine = 'deepspeed' "
                "(the native engine does not offload)",
            )
        _check(
            p.deepspeed_config == "",
            "parallel.deepspeed_config is set but parallel.engine is 'native': "
            "set parallel.engine = 'deepspeed' or remove the key",
        )
        return
    others = {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp_replicate": p.dp_replicate}
    for key, value in others.items():
        _check(
            value == 1,
            f"parallel.engine = 'deepspeed' shards data-parallel only: parallel.{key} must be 1 "
            f"(got {value}); use the native engine for tensor, pipeline, context or hybrid "
            "layouts",
        )
    _check(
        not p.offload_params or p.zero_stage == 3,
        f"parallel.offload_params needs parallel.zero_stage = 3 (got {p.zero_stage})",
    )
    _check(
        not p.offload_optimizer or p.zero_stage >= 1,
        "parallel.offload_optimizer needs parallel.zero_stage >= 1 (stage 0 keeps no "
        "partitioned optimizer state to offload)",
    )
    if p.deepspeed_config:
        path = Path(p.deepspeed_config)
        _check(path.is_file(), f"parallel.deepspeed_config: file not found: {path}")


def _validate_pipeline(p: ParallelConfig, m: ModelConfig, d: DataConfig, t: TrainingConfig) -> None:
    _check(
        p.pp_stages_per_rank >= 1 and p.pp_microbatches >= 0,
        "parallel.pp_stages_per_rank must be >= 1 and pp_microbatches >= 0",
    )
    rules.check_stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
    if p.pp == 1 and p.pp_split_points == "":
        return
    if p.pp > 1:
        stages = rules.num_stages(p)
        _check(
            stages <= m.n_layers,
            f"parallel.pp ({p.pp}) x pp_stages_per_rank ({p.pp_stages_per_rank}) = {stages} stages "
            f"exceeds model.n_layers ({m.n_layers}); each stage needs at least one layer",
        )
        _check(
            d.cross_document_attention,
            "data.cross_document_attention = false is not supported with parallel.pp > 1 "
            "(document ids do not travel between pipeline stages)",
        )
        rules.pipeline_microbatches(p, t.micro_batch_size)
        _check(
            not (p.pp_schedule == "zero_bubble" and t.compile),
            "parallel.pp_schedule = 'zero_bubble' cannot run compiled blocks (its split backward "
            "is not supported under torch.compile); set training.compile = false or use 1f1b",
        )
    rules.split_points(p, m.n_layers)


# Which data.format each training.objective trains on.
_OBJECTIVE_FORMAT = {"pretrain": "text", "sft": "chat", "dpo": "preference"}


def _validate_objective(cfg: Config) -> None:
    """training.objective against the data format, the model source and the layout."""
    t, d, p, m = cfg.training, cfg.data, cfg.parallel, cfg.model
    want = _OBJECTIVE_FORMAT[t.objective]
    if d.format != want:
        needs = next(o for o, f in _OBJECTIVE_FORMAT.items() if f == d.format)
        raise ConfigError(
            f"training.objective = '{t.objective}' trains on data.format = '{want}', got "
            f"data.format = '{d.format}' (which is for training.objective = '{needs}')"
        )
    if d.format == "chat" and d.packing == "pack":
        _check(
            p.pp == 1,
            "data.packing = 'pack' keeps attention within each example, which parallel.pp > 1 "
            "does not support (document ids do not travel between pipeline stages); set "
            "data.packing = 'pad'",
        )
    if t.objective != "dpo":
        return
    _check(cfg.dpo.beta > 0, f"dpo.beta must be > 0, got {cfg.dpo.beta}")
    _check(
        0 <= cfg.dpo.label_smoothing < 0.5,
        f"dpo.label_smoothing must be in [0, 0.5), got {cfg.dpo.label_smoothing}",
    )
    _check(
        m.init_from != "",
        "training.objective = 'dpo' tunes a trained model against itself as it started: set "
        "model.init_from = 'hf:PATH' or 'run:DIR' (usually a model after SFT)",
    )
    for key in ("tp", "pp", "cp"):
        _check(
            getattr(p, key) == 1,
            f"training.objective = 'dpo' runs in data-parallel layouts (dp_replicate, dp_shard, "
            f"DeepSpeed ZeRO): parallel.{key} must be 1, got {getattr(p, key)}",
        )
    _check(
        t.loss_chunk_tokens == 0,
        "training.objective = 'dpo' needs each sequence's log-probabilities, not a chunked "
        "loss: set training.loss_chunk_tokens = 0",
    )


def _validate_lora(cfg: Config) -> None:
    """The [lora] section, and what adapters cannot be combined with."""
    lo, m, t, p = cfg.lora, cfg.model, cfg.training, cfg.parallel
    _check(lo.rank >= 0, f"lora.rank must be >= 0 (0: no adapters), got {lo.rank}")
    if lo.rank == 0:
        return
    _check(lo.alpha > 0, f"lora.alpha must be > 0, got {lo.alpha}")
    _check(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}")
    targets = rules.lora_targets(lo.targets)
    _check(
        m.init_from != "",
        f"lora.rank = {lo.rank} trains adapters on a frozen base, but model.init_from is empty: "
        "the base would be random weights; set model.init_from = 'hf:PATH' or 'run:DIR[@STEP]' "
        "(or lora.rank = 0 to train every weight)",
    )
    ffn = [name for name in targets if name in ("w1", "w2", "w3")]
    _check(
        not (ffn and m.moe_experts > 0),
        f"lora.targets = '{lo.targets}' includes {', '.join(ffn)}, but model.moe_experts = "
        f"{m.moe_experts}: Mixture-of-Experts feed-forwards get no adapters; target the "
        "attention projections (wq, wk, wv, wo)",
    )
    if "output" in targets:
        _check(
            not m.tie_embeddings,
            "lora.targets includes output, but model.tie_embeddings = true (the head is the "
            "embedding table): drop output from lora.targets",
        )
        _check(
            t.loss_chunk_tokens == 0,
            "lora.targets includes output, but training.loss_chunk_tokens > 0 computes the head "
            "from its weight alone: set training.loss_chunk_tokens = 0 or drop output",
        )
        _check(
            p.pp == 1 or len(targets) > 1,
            "lora.targets = 'output' with parallel.pp > 1 leaves the earlier pipeline stages "
            "nothing to train: add block layers (e.g. wq,wv,output) or set parallel.pp = 1",
        )
    _check(
        not t.float8,
        "training.float8 = true swaps the linear layers for float8 ones, which carry no LoRA "
        "adapters: set training.float8 = false",
    )
    _check(
        lo.base_dtype == "float32" or t.dtype == "bfloat16",
        "lora.base_dtype = 'bfloat16' needs training.dtype = 'bfloat16' (in float32 compute "
        "the bfloat16 base weights would meet float32 activations); set one or the other",
    )
    _check(
        p.ep == 1,
        f"parallel.ep = {p.ep} is not supported with LoRA (lora.rank = {lo.rank}); set "
        "parallel.ep = 1",
    )
