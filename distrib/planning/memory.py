"""Per-rank memory of a layout: model states (exact, `distrib.planning.states`), activations per
activation-checkpointing mode, the loss's logits, and FSDP's gathered weights.

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
from distrib.config.families import resolved_head_dim
from distrib.config.rules import pipeline_microbatches
from distrib.planning.states import StateCounts

GB = 1e9
_FP32 = 4


def compute_bytes(cfg: Config) -> int:
    """Bytes of one activation element: 2 under bfloat16 training, else 4."""
    return 2 if cfg.training.dtype == "bfloat16" else _FP32


def block_bytes_per_token(cfg: Config, tp: int, mode: str) -> float:
    """Bytes one transformer block saves for backward per token of its input, on one rank.

    - "none": each RMSNorm keeps its float32 input (pow's operand) and its normalized output
      ((4 + e) D); with tp > 1 sequence parallelism splits those by tp and the gathered norm
      output (e D) is what the projections keep. Attention keeps q, k, v after RoPE, its output
      and float32 log-sum-exp; wo keeps a contiguous copy of that output. The SwiGLU keeps w1's
      and w3's outputs, the SiLU and the product (4 e F).
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
    if mode == "selective":
        return block_input + e * (a + 2 * gk) + e * a + lse + 2 * e * d / tp + 2 * e * f
    norms = 2 * (_FP32 + e) * d / tp + (2 * e * d if tp > 1 else 0.0)
    return norms + e * (3 * a + 2 * gk) + lse + 4 * e * f


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the busiest rank, by kind; `total` is their sum."""

    params: float
    grads: float
    optimizer: float
    activations: float  # saved for backward at the end of forward, the loss's excluded
    logits: float  # the loss's peak, at the end of forward
    recompute: float  # backward's working set for one block (see `workspace_bytes`)
    gathered: float  # FSDP's unsharded weights in flight (0 without FSDP)

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
    """Every term for the busiest rank; `shards` is FSDP's degree (dp_shard x cp), 1 without.
    Under a pipeline the first stage (most micro-batches in flight) and the last (the logits)
    are both worked out and the larger peak is reported."""
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


def predict_memory(cfg: Config, world_size: int) -> MemoryBreakdown:
    """`memory_breakdown` for `cfg`'s layout at `world_size`, state counts included."""
    from distrib.parallel.dims import ParallelDims
    from distrib.parallel.parallelize import uses_fsdp
    from distrib.planning.states import state_counts

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    shards = dims.dp_shard * dims.cp if uses_fsdp(dims) else 1
    counts = state_counts(cfg, world_size)
    return memory_breakdown(cfg, counts, dims.tp, dims.cp, dims.pp, shards)
