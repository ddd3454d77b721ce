"""Per-rank memory of a layout: model states (exact, `distrib.planning.states`), activations per
activation-checkpointing mode, the loss's logits, and FSDP's gathered weights.

Under DeepSpeed the model states are those ZeRO keeps (`deepspeed_states`); an MoE block's
feed-forward saves its routed rows per chosen expert (`block_bytes_per_token`).

The activation terms follow what this project's block saves for backward, op by op (see
`block_bytes_per_token`), not a generic formula: the measured bytes of bench/memory.py's
`activation_mb` check them (tests/distributed/test_plan_memory.py).

Legend: D model dim, A = H x K / tp query width per tp rank, Gk = G x K / tp kv width per tp rank,
F = ffn_dim / tp, V vocabulary (/ tp under loss parallelism), e bytes per element of the compute
dtype, T tokens of one micro-batch on this rank (batch x seq / cp).
"""

from __future__ import annotations

from dataclasses import dataclass

from distrib.config import Config
from distrib.config.families import moe_layer_count, resolved_head_dim, resolved_moe_ffn_dim
from distrib.config.rules import pipeline_microbatches
from distrib.planning.states import StateCounts

GB = 1e9
_FP32 = 4
_INDEX = 8  # int64


def compute_bytes(cfg: Config) -> int:
    """Bytes of one activation element: 2 under bfloat16 training, else 4."""
    return 2 if cfg.training.dtype == "bfloat16" else _FP32


def block_bytes_per_token(cfg: Config, tp: int, mode: str) -> float:
    """Bytes one transformer block saves for backward per token of its input, on one rank
    (averaged over the blocks when some are MoE and some dense).

    - "none": each RMSNorm keeps its float32 input (pow's operand) and its normalized output
      ((4 + e) D); with tp > 1 sequence parallelism splits those by tp and the gathered norm
      output (e D) is what the projections keep. Attention keeps q, k, v after RoPE, its output
      and float32 log-sum-exp; wo keeps a contiguous copy of that output. The SwiGLU keeps w1's
      and w3's outputs, the SiLU and the product (4 e F). An MoE feed-forward (`models/moe.py`,
      measured op by op) keeps, per token, the router's float32 scores (softmax's output) and
      the top-k normalization's sum and its clamp (4 (E + 2)); per chosen expert (top_k) the
      gathered row, the experts' output (kept by the product with the routing weight) and that
      product (kept by index_add_, whose backward needs its source's shape) (3 e D), the
      expert's SwiGLU's four F-wide tensors (4 e F), three int64 indices (the chosen expert,
      the dispatch order, the token of each row: 24) and two float32 weights (the top-k weight
      and its row's copy: 8); its shared experts as a dense SwiGLU. The router's logits are
      not kept (softmax keeps its output).
    - "selective": the outputs of every matmul and of attention (`parallel/activation.py`),
      and the block input.
    - "full": the block input only (the recomputation of one block in backward is added once
      per rank by `activation_bytes`).
    """
    m, e = cfg.model, compute_bytes(cfg)
    k = resolved_head_dim(m)
    d, a, gk, f = m.dim, m.n_heads * k / tp, m.n_kv_heads * k / tp, m.ffn_dim / tp
    lse = _FP32 * m.n_heads / tp
    block_input = e * d / tp
    if mode == "full":
        return block_input
    moe = moe_layer_count(m)
    top, fe = m.moe_top_k, resolved_moe_ffn_dim(m) if moe else 0
    fs = fe * m.moe_shared_experts / tp
    if mode == "selective":
        dense_ffn = e * d / tp + 2 * e * f
        moe_ffn = e * m.moe_experts + top * e * (d + 2 * fe) + (e * d / tp + 2 * e * fs) * (fs > 0)
        attn = block_input + e * (a + 2 * gk) + e * a + lse + e * d / tp
    else:
        dense_ffn = 4 * e * f
        routed = e * (3 * d + 4 * fe) + 3 * _INDEX + 2 * _FP32
        moe_ffn = _FP32 * (m.moe_experts + 2) + top * routed + 4 * e * fs
        norms = 2 * (_FP32 + e) * d / tp + (2 * e * d if tp > 1 else 0.0)
        attn = norms + e * (3 * a + 2 * gk) + lse
    ffn = ((m.n_layers - moe) * dense_ffn + moe * moe_ffn) / m.n_layers
    return attn + ffn


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the busiest rank, by kind; `total` is their sum."""

    params: float
    grads: float
    optimizer: float
    activations: float  # saved for backward at the end of forward, the loss's excluded
    logits: float  # the loss's peak, at the end of forward
    recompute: float  # backward's working set for one block (see `workspace_bytes`); DeepSpeed
    # ZeRO-1/2's reduce bucket
    gathered: float  # FSDP's unsharded weights in flight (0 without FSDP); DeepSpeed's buckets
    host: float = 0.0  # DeepSpeed offload: bytes kept in host memory instead (not in `total`)

    @property
    def total(self) -> float:
        """The step's peak: weights, optimizer state and gathered weights throughout, plus the
        larger of the end of forward (activations and the loss) and backward (activations, a
        recomputed block, the gradients)."""
        forward_end = self.activations + self.logits
        backward = self.activations + self.recompute + self.grads
        return self.params + self.optimizer + self.gathered + max(forward_end, backward)


def _in_flight(cfg: Config, pp: int) -> tuple[int, float]:
    """(pipeline micro-batches the first stage holds at once, sequences in each)."""
    b = cfg.training.micro_batch_size
    if pp == 1:
        return 1, float(b)
    n = pipeline_microbatches(cfg.parallel, b)
    stages = pp * cfg.parallel.pp_stages_per_rank
    held = n if cfg.parallel.pp_schedule == "gpipe" else min(n, stages)
    return held, b / n


def _mode(cfg: Config) -> str:
    mode = cfg.parallel.activation_checkpoint
    return "none" if mode == "memory_budget" else mode


def _tokens(cfg: Config, cp: int, pp: int) -> float:
    """Tokens of one (pipeline) micro-batch on this rank."""
    _, sequences = _in_flight(cfg, pp)
    return sequences * cfg.data.seq_len / cp


def activation_bytes(cfg: Config, tp: int, cp: int, pp: int, last: bool = True) -> float:
    """Saved activations at the end of forward on the first pipeline stage (`last` False: the
    micro-batches its schedule holds at once) or the last (one micro-batch, the final norm, and
    under a pipeline the logits it keeps as its output until their backward); without a
    pipeline both are the one rank."""
    held, _ = _in_flight(cfg, pp)
    tokens, e = _tokens(cfg, cp, pp), compute_bytes(cfg)
    per_layer = tokens * block_bytes_per_token(cfg, tp, _mode(cfg))
    layers = cfg.model.n_layers / pp
    if not last:
        return held * layers * per_layer
    saved = layers * per_layer + tokens * (_FP32 + e) * cfg.model.dim / tp
    if pp > 1:
        saved += tokens * e * _vocab(cfg, tp)
    return saved


def _vocab(cfg: Config, tp: int) -> float:
    return cfg.model.vocab_size / (tp if cfg.parallel.loss_parallel else 1)


def workspace_bytes(cfg: Config, tp: int, cp: int, pp: int) -> float:
    """What backward builds beyond the saved activations for one block: under full
    checkpointing the block's activations rebuilt, and under ring attention (cp > 1) its
    float32 working set: q, the output gradient and dq, the keys and values repeated to the
    query heads with their gradients, the held, received and gradient buffers of the kv heads,
    and one pair of chunks' scores, probabilities and their gradient."""
    tokens = _tokens(cfg, cp, pp)
    rebuilt = tokens * block_bytes_per_token(cfg, tp, "none") if _mode(cfg) == "full" else 0.0
    if cp == 1 or cfg.parallel.cp_mode != "ring":
        return rebuilt
    m = cfg.model
    k = resolved_head_dim(m)
    a, gk = m.n_heads * k / tp, m.n_kv_heads * k / tp
    _, sequences = _in_flight(cfg, pp)
    chunk = cfg.data.seq_len / (2 * cp)
    scores = 3 * sequences * (m.n_heads / tp) * chunk * chunk
    return rebuilt + _FP32 * (tokens * (7 * a + 6 * gk) + scores)


def logits_bytes(cfg: Config, tp: int, cp: int, pp: int) -> float:
    """The loss's peak: logits in the compute dtype, their float32 copy and log-softmax (the
    cross-entropy's saved output), for the tokens of one (pipeline) micro-batch or one chunk."""
    tokens = _tokens(cfg, cp, pp)
    if cfg.training.loss_chunk_tokens > 0:
        tokens = min(tokens, cfg.training.loss_chunk_tokens)
    return tokens * _vocab(cfg, tp) * (compute_bytes(cfg) + 2 * _FP32)


def gathered_bytes(cfg: Config, counts: StateCounts, shards: int, tp: int) -> float:
    """FSDP's all-gathered weights in flight: the block being computed and the one prefetched,
    in the compute dtype (0 when nothing is sharded)."""
    if shards <= 1:
        return 0.0
    block = (counts.total_params - 2 * cfg.model.vocab_size * cfg.model.dim) / cfg.model.n_layers
    return 2 * block / tp * compute_bytes(cfg)


def memory_breakdown(
    cfg: Config, counts: StateCounts, tp: int, cp: int, pp: int, shards: int
) -> MemoryBreakdown:
    """Every term for the busiest rank; `shards` is FSDP's degree (dp_shard x cp), 1 without
    (under DeepSpeed: the data-parallel degree ZeRO partitions over). Under a pipeline the first
    stage (most micro-batches in flight) and the last (the logits) are both worked out and the
    larger peak is reported."""
    if cfg.parallel.engine == "deepspeed":
        return deepspeed_breakdown(cfg, counts, shards)
    stages = [
        MemoryBreakdown(
            params=_FP32 * counts.params,
            grads=_FP32 * counts.trainable,
            optimizer=2 * _FP32 * counts.trainable,  # AdamW's two float32 moments
            activations=activation_bytes(cfg, tp, cp, pp, last),
            logits=logits_bytes(cfg, tp, cp, pp) if last else 0.0,
            recompute=workspace_bytes(cfg, tp, cp, pp),
            gathered=gathered_bytes(cfg, counts, shards, tp),
        )
        for last in ((True, False) if pp > 1 else (True,))
    ]
    return max(stages, key=lambda b: b.total)


@dataclass(frozen=True)
class ZeroBuffers:
    """The `zero_optimization` settings that size DeepSpeed's buffers: DeepSpeed's defaults
    (deepspeed/runtime/zero/config.py) under the user's `parallel.deepspeed_config` JSON."""

    reduce_bucket: float = 5e8  # reduce_bucket_size, elements
    prefetch_bucket: float = 5e7  # stage3_prefetch_bucket_size
    persistence_threshold: float = 1e5  # stage3_param_persistence_threshold
    contiguous_gradients: bool = True
    overlap_comm: bool | None = None  # None: on at stage 3 only


def zero_buffers(cfg: Config, dp: int) -> ZeroBuffers:
    """`ZeroBuffers` of `cfg`'s effective DeepSpeed config (the translated one, the user's JSON
    merged over it: `distrib.engines.deepspeed.config`, which imports no DeepSpeed)."""
    from distrib.engines.deepspeed.config import effective_config

    zero = effective_config(cfg, dp, "cuda").get("zero_optimization", {})
    d = ZeroBuffers()

    def get(*keys: str, default: float | bool | None) -> float | bool | None:
        return next((zero[k] for k in keys if k in zero), default)

    return ZeroBuffers(
        reduce_bucket=float(get("reduce_bucket_size", default=d.reduce_bucket)),  # type: ignore[arg-type]
        prefetch_bucket=float(
            get("stage3_prefetch_bucket_size", "prefetch_bucket_size", default=d.prefetch_bucket)  # type: ignore[arg-type]
        ),
        persistence_threshold=float(
            get(  # type: ignore[arg-type]
                "stage3_param_persistence_threshold",
                "param_persistence_threshold",
                default=d.persistence_threshold,
            )
        ),
        contiguous_gradients=bool(get("contiguous_gradients", default=True)),
        overlap_comm=get("overlap_comm", default=None),  # type: ignore[arg-type]
    )


def deepspeed_breakdown(cfg: Config, counts: StateCounts, dp: int) -> MemoryBreakdown:
    """The DeepSpeed engine's rank (`distrib/engines/deepspeed`): weights and gradients in the
    training dtype e (DeepSpeed casts the model to bfloat16 under bfloat16 training), float32
    master weights of the rank's partition (stages 1-3 always keep one, a copy even in float32;
    stage 0 only under bfloat16), AdamW's two float32 moments of the partition, and per stage:
    0 whole gradients; 1 whole gradients plus the partition's float32 gradient and a float32
    reduce bucket; 2 the partition's gradients (plus their float32 copy under bfloat16) and a
    reduce bucket in e (at stages 1-2 the bucket is allocated at each backward and released
    after the step, so it counts in backward's working set, `recompute`); 3 the partition of
    everything, a reduce bucket in e (allocated at start-up, kept), the persistent parameters (stage3_param_persistence_threshold elements or fewer:
    gathered once and kept whole), and the gathered block and its prefetch. The reduce buckets
    exist with contiguous_gradients (the default), two of them at stages 1-2 under
    overlap_comm (off there by default). Optimizer offload moves master weights, moments and
    the float32 gradient partition to the host, parameter offload (stage 3) the weight
    partition. Measured on CPU in tests/distributed/test_plan_memory.py."""
    from distrib.planning.states import deepspeed_persistent

    p = cfg.parallel
    e = compute_bytes(cfg)
    z = zero_buffers(cfg, dp)
    stage, whole, part = p.zero_stage, counts.total_params, counts.trainable
    bf16 = e != _FP32
    master = _FP32 * part if stage > 0 or bf16 else 0.0
    moments = 2 * _FP32 * part
    params = e * counts.params
    reduce = z.reduce_bucket if z.contiguous_gradients else 0.0
    if stage in (1, 2) and z.overlap_comm:
        reduce *= 2
    backward = 0.0  # the stage 1-2 reduce bucket, in backward's working set
    if stage == 0:
        grads, fp32_grads, bucket = e * whole, (_FP32 * whole if bf16 else 0.0), 0.0
    elif stage == 1:  # the reduce bucket: made at each backward, gone after the step
        grads, fp32_grads, bucket, backward = e * whole, _FP32 * part, 0.0, _FP32 * reduce
    elif stage == 2:
        grads, fp32_grads, bucket, backward = (
            e * part,
            (_FP32 * part if bf16 else 0.0),
            0.0,
            e * reduce,
        )
    else:
        grads, fp32_grads = e * part, (_FP32 * part if bf16 else 0.0)
        persistent, block = deepspeed_persistent(cfg, z.persistence_threshold)
        bucket = e * (reduce + persistent + block + min(block, z.prefetch_bucket))
    host = 0.0
    if p.offload_optimizer:
        host, master, moments, fp32_grads = master + moments + fp32_grads, 0.0, 0.0, 0.0
    if p.offload_params:
        host, params = host + params, 0.0
    return MemoryBreakdown(
        params=params,
        grads=grads + fp32_grads,
        optimizer=master + moments,
        activations=activation_bytes(cfg, 1, 1, 1),
        logits=logits_bytes(cfg, 1, 1, 1),
        recompute=workspace_bytes(cfg, 1, 1, 1) + backward,
        gathered=bucket,
        host=host,
    )


def predict_memory(cfg: Config, world_size: int) -> MemoryBreakdown:
    """`memory_breakdown` for `cfg`'s layout at `world_size`, state counts included."""
    from distrib.parallel.dims import ParallelDims
    from distrib.parallel.parallelize import uses_fsdp
    from distrib.planning.states import state_counts

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    shards = dims.dp_shard * dims.cp if uses_fsdp(dims) else 1
    if cfg.parallel.engine == "deepspeed":
        shards = dims.dp
    counts = state_counts(cfg, world_size)
    return memory_breakdown(cfg, counts, dims.tp, dims.cp, dims.pp, shards)
