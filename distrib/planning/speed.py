"""Step time of a layout: computation at a fitted share of the device's peak, plus each
collective's time from its message sizes and the bandwidth of the links its group spans, less
what overlaps with computation.

What overlaps and what does not (as this project runs them):
- FSDP's all-gathers and reduce-scatters run ahead of / behind the blocks (prefetch), so only
  what exceeds the computation is exposed, and at least one block's share (the first gather).
- Replicated gradients (DDP, HSDP's replicate axis) reduce during backward: exposed beyond it.
- Tensor parallelism's all-gathers and reduce-scatters sit between the matmuls that need them:
  all exposed.
- Ring attention's key/value passes run while the previous block's attention computes: exposed
  beyond the attention's own time. The all-to-all form waits on each of its four exchanges.
- A pipeline idles (pp - 1) / (m x v) of the computation (m micro-batches per step, v stages per
  rank); its point-to-point activations are small next to the rest and are not counted.
- The optimizer step reads and writes every local parameter, gradient and moment once: bound by
  the memory bandwidth.
- Activation checkpointing's recomputation: full repeats each block's forward (its matmul and
  attention FLOPs at the compute rate, its elementwise ops at the memory bandwidth); selective
  saves the matmul and attention outputs and repeats only the elementwise ops (norms, RoPE,
  SiLU and the gate product, residual adds, copies; `elementwise_bytes_per_token`), which read
  and write memory and barely compute: memory-bound time at `hbm_gbps`.
- Expert parallelism: each MoE layer sends its routed rows (tokens x top_k x D) to the experts'
  ranks and back, two all-to-alls forward, two backward and two more per recomputed forward;
  they sit between the router and the experts: all exposed.
- DeepSpeed ZeRO (`deepspeed_time`): stages 0-2 reduce gradients and (1-2) gather the updated
  partitions after the step without overlap (DeepSpeed's overlap_comm default is off below
  stage 3); stage 3 gathers weights for forward and backward like FSDP, overlapped. Optimizer
  offload moves the gradient partition to the host and the updated weights back over the host
  link, and steps AdamW on the host, bound by the host's memory bandwidth.

Legend: N world size, T tokens, D model dim, e bytes per element of the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distrib.config import Config
from distrib.config.families import moe_layer_count, resolved_head_dim, resolved_moe_ffn_dim
from distrib.config.rules import grad_accum_steps, pipeline_microbatches
from distrib.parallel.dims import ParallelDims
from distrib.planning.hardware import Device
from distrib.planning.states import StateCounts
from distrib.train.metrics import active_matmul_params, flops_per_token

_FP32 = 4


@dataclass
class StepTime:
    """Seconds of one optimizer step on every rank, by cause; `lines` shows the arithmetic."""

    compute: float = 0.0
    bubble: float = 0.0
    recompute: float = 0.0
    tp: float = 0.0
    cp: float = 0.0
    ep: float = 0.0
    dp: float = 0.0
    optimizer: float = 0.0
    lines: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The step: every term added (what overlaps was already taken off each)."""
        return (
            self.compute
            + self.bubble
            + self.recompute
            + self.tp
            + self.cp
            + self.ep
            + self.dp
            + self.optimizer
        )


def _spans_nodes(size: int, stride: int, gpus_per_node: int) -> bool:
    """Whether a group of `size` ranks `stride` apart (the mesh puts tp innermost, then cp,
    dp_shard, dp_replicate, pp) reaches beyond one node."""
    return size > 1 and size * stride > gpus_per_node


def _bandwidth(device: Device, inter: bool) -> float:
    """Bytes per second a collective reaches on those links."""
    gbps = device.inter_node_gbps if inter else device.intra_node_gbps
    return gbps * 1e9 * device.comm_efficiency


def _ring_bytes(size: int, nbytes: float) -> float:
    """What each rank sends for an all-gather or reduce-scatter of `nbytes` over `size` ranks."""
    return nbytes * (size - 1) / size


def elementwise_bytes_per_token(cfg: Config, tp: int) -> float:
    """Bytes one block's elementwise ops read and write per token in one forward, on one rank
    (what selective checkpointing recomputes): two RMSNorms (square, mean, scale, the weight
    and, in bfloat16, two float32 casts), RoPE on q and k (rotate, two products, a sum: about
    9 passes), wo's contiguous copy, two residual adds, and the feed-forward's SiLU and gate
    product (5 F-wide passes; an MoE layer: per routed row, plus the gather of the rows, their
    weighting and the scatter-add back, and its shared experts). Sequence parallelism splits
    the norms and residuals by tp."""
    m, e = cfg.model, _bytes(cfg)
    k = resolved_head_dim(m)
    a, gk = m.n_heads * k / tp, m.n_kv_heads * k / tp
    cast = 2 * (e + _FP32) if e != _FP32 else 0
    norm = (8 + 4 + 8 + cast + 2 * e) * m.dim / tp
    attention = 9 * e * (a + gk) + 2 * e * a
    residual = 2 * 3 * e * m.dim / tp
    dense = 5 * e * m.ffn_dim / tp
    per_layer = [2 * norm + attention + residual] * m.n_layers
    moe = moe_layer_count(m)
    if moe:
        f = resolved_moe_ffn_dim(m)
        routed = m.moe_top_k * (5 * e * f / tp + 3 * 2 * e * m.dim)
        shared = 5 * e * f * m.moe_shared_experts / tp
        ffn = (m.n_layers - moe) * dense + moe * (routed + shared)
    else:
        ffn = m.n_layers * dense
    return (sum(per_layer) + ffn) / m.n_layers


def _bytes(cfg: Config) -> int:
    return 2 if cfg.training.dtype == "bfloat16" else _FP32


def step_time(
    cfg: Config, dims: ParallelDims, counts: StateCounts, device: Device, gpus_per_node: int
) -> StepTime:
    """Predicted step time of `cfg` under `dims` on `device` (see the module docstring)."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    out = StepTime()
    e = _bytes(cfg)
    n = dims.world_size
    seq = cfg.data.seq_len
    step_tokens = t.global_batch_size * seq
    per_token = flops_per_token(m, seq)
    # Float8 runs the block linears (not the output head, not attention) at the float8 rate.
    head = 6.0 * m.vocab_size * m.dim
    linear = 6.0 * active_matmul_params(m) - head
    other = per_token - linear
    rate = device.peak_tflops(t.dtype if t.dtype == "bfloat16" else "float32") * 1e12
    base = rate * device.matmul_efficiency
    fast = device.peak_fp8_tflops * 1e12 * device.float8_efficiency if t.float8 else base
    out.compute = step_tokens * (linear / fast + other / base) / n
    out.lines.append(
        f"compute: {step_tokens:,} tokens x {per_token / 1e9:.2f} GFLOP/token / {n} GPUs at "
        f"{device.matmul_efficiency:.0%} of {rate / 1e12:.0f} TFLOP/s"
        + (
            f", block linears in float8 at {device.float8_efficiency:.0%} of "
            f"{device.peak_fp8_tflops:.0f}"
            if t.float8
            else ""
        )
        + f" = {out.compute:.3f} s"
    )
    mode = p.activation_checkpoint
    tokens_per_rank = step_tokens / (dims.dp * dims.cp)  # every tp and pp rank sees them
    layers = m.n_layers / dims.pp
    if mode in ("selective", "full"):
        moved = tokens_per_rank * layers * elementwise_bytes_per_token(cfg, dims.tp)
        out.recompute = moved / (device.hbm_gbps * 1e9)
        text = f"{moved / 1e9:.2f} GB of elementwise ops at {device.hbm_gbps:.0f} GB/s"
        if mode == "full":  # the blocks' matmuls and attention once more: a third of theirs
            again = step_tokens * (linear / fast + (other - head) / base) / 3 / n
            out.recompute += again
            text = f"one block forward, {again:.3f} s of FLOPs + " + text
        out.lines.append(f"recompute ({mode} AC): {text} = {out.recompute:.3f} s")
    accum = grad_accum_steps(t, dims.dp)
    micro_tokens = t.micro_batch_size * seq / dims.cp  # one micro-batch, on one cp rank
    if dims.pp > 1:
        pipe_micro = accum * pipeline_microbatches(p, t.micro_batch_size)
        out.bubble = (
            (out.compute + out.recompute) * (dims.pp - 1) / (pipe_micro * p.pp_stages_per_rank)
        )
        out.lines.append(
            f"pipeline bubble: (pp {dims.pp} - 1) / ({pipe_micro} micro-batches x "
            f"{p.pp_stages_per_rank} stages per rank) of compute = {out.bubble:.3f} s"
        )
    recomputes = mode == "full"
    if dims.tp > 1:
        inter = _spans_nodes(dims.tp, 1, gpus_per_node)
        per = _ring_bytes(dims.tp, micro_tokens * m.dim * e)
        count = (8 + (4 if recomputes else 0)) * layers * accum
        out.tp = count * per / _bandwidth(device, inter)
        out.lines.append(
            f"tp: {count:.0f} all-gathers/reduce-scatters of {per / 1e6:.1f} MB per rank over "
            f"{'inter' if inter else 'intra'}-node links, not overlapped = {out.tp:.3f} s"
        )
    if dims.cp > 1:
        out.cp = _cp_time(cfg, dims, device, gpus_per_node, micro_tokens, layers, accum, out)
    if dims.ep > 1:
        out.ep = _ep_time(cfg, dims, device, gpus_per_node, micro_tokens, accum, out)
    compute = out.compute + out.bubble + out.recompute
    if p.engine == "deepspeed":
        deepspeed_time(cfg, dims, counts, device, gpus_per_node, compute, out)
        return out
    _native_dp_time(cfg, dims, counts, device, gpus_per_node, compute, out)
    # AdamW reads parameter, gradient and both moments and writes three of them: 7 x 4 bytes.
    out.optimizer = counts.trainable * 7 * _FP32 / (device.hbm_gbps * 1e9)
    out.lines.append(
        f"optimizer: {counts.trainable:,} local parameters, memory-bound = {out.optimizer:.3f} s"
    )
    return out


def expert_params(cfg: Config) -> int:
    """Parameters of all routed experts (0 for a dense model)."""
    m = cfg.model
    return moe_layer_count(m) * m.moe_experts * 3 * m.dim * resolved_moe_ffn_dim(m)


def _native_dp_time(
    cfg: Config,
    dims: ParallelDims,
    counts: StateCounts,
    device: Device,
    gpus_per_node: int,
    compute: float,
    out: StepTime,
) -> None:
    """FSDP's gathers and reduce-scatters, and the replicate axis's all-reduce, into `out.dp`."""
    e = _bytes(cfg)
    t, m = cfg.training, cfg.model
    accum = grad_accum_steps(t, dims.dp)
    layers = m.n_layers / dims.pp
    shards = dims.dp_shard * dims.cp
    gathers = 2 + (1 if cfg.parallel.activation_checkpoint == "full" else 0)
    # Under expert parallelism the experts are gathered over dp_shard / ep ranks only.
    experts = expert_params(cfg) / (dims.tp * dims.pp) if dims.ep > 1 else 0.0
    dense = counts.total_params / (dims.tp * dims.pp) - experts
    if shards > 1:
        inter = _spans_nodes(shards, dims.tp, gpus_per_node)
        efsdp = shards // dims.ep
        volume = _ring_bytes(shards, dense) + _ring_bytes(efsdp, experts / dims.ep)
        fsdp = (gathers * accum * volume * e + volume * _FP32) / _bandwidth(device, inter)
        exposed = max(fsdp - compute * device.comm_overlap, fsdp / max(layers, 1))
        out.dp += exposed
        out.lines.append(
            f"fsdp over {shards} ranks ({'inter' if inter else 'intra'}-node): {gathers} x "
            f"{accum} gathers of {volume * e / 1e9:.2f} GB + reduce-scatter "
            f"{volume * _FP32 / 1e9:.2f} GB = {fsdp:.3f} s, exposed {exposed:.3f} s"
        )
    if dims.dp_replicate > 1:
        inter = _spans_nodes(dims.dp_replicate, shards * dims.tp, gpus_per_node)
        inter = inter or shards * dims.tp >= gpus_per_node
        grads = counts.trainable * _FP32
        reduce = 2 * _ring_bytes(dims.dp_replicate, grads) / _bandwidth(device, inter)
        exposed = max(0.0, reduce - compute * 2 / 3)
        out.dp += exposed
        out.lines.append(
            f"replicate all-reduce over {dims.dp_replicate} ({'inter' if inter else 'intra'}-"
            f"node) of {grads / 1e9:.2f} GB = {reduce:.3f} s, exposed beyond backward "
            f"{exposed:.3f} s"
        )


def _ep_time(
    cfg: Config,
    dims: ParallelDims,
    device: Device,
    gpus_per_node: int,
    micro_tokens: float,
    accum: int,
    out: StepTime,
) -> float:
    m = cfg.model
    # ep is the inner part of dp_shard (cp is 1 with ep): its ranks are tp apart.
    inter = _spans_nodes(dims.ep, dims.tp, gpus_per_node)
    rows = micro_tokens * m.moe_top_k * m.dim * _bytes(cfg)
    per = rows * (dims.ep - 1) / dims.ep  # what leaves this rank; the rest stays local
    # Dispatch and combine in forward and backward; again in a recomputed forward (selective
    # checkpointing saves matmul outputs, not the collectives).
    passes = 4 + (2 if cfg.parallel.activation_checkpoint in ("selective", "full") else 0)
    count = passes * moe_layer_count(m) / dims.pp * accum
    seconds = count * per / _bandwidth(device, inter)
    out.lines.append(
        f"ep all-to-all over {dims.ep} ({'inter' if inter else 'intra'}-node): {count:.0f} "
        f"exchanges of {per / 1e6:.1f} MB per rank (tokens x top-{m.moe_top_k} x dim), not "
        f"overlapped = {seconds:.3f} s"
    )
    return seconds


def deepspeed_time(
    cfg: Config,
    dims: ParallelDims,
    counts: StateCounts,
    device: Device,
    gpus_per_node: int,
    compute: float,
    out: StepTime,
) -> None:
    """DeepSpeed's data-parallel traffic and optimizer step into `out` (module docstring).
    `counts.trainable` is this rank's optimizer partition, `counts.total_params` the model."""
    p, t = cfg.parallel, cfg.training
    e = _bytes(cfg)  # DeepSpeed holds weights and gradients in the training dtype
    dp, stage = dims.dp, p.zero_stage
    accum = grad_accum_steps(t, dp)
    whole = counts.total_params
    inter = _spans_nodes(dp, 1, gpus_per_node)
    bandwidth = _bandwidth(device, inter)
    where = "inter" if inter else "intra"
    if dp > 1 and stage <= 2:
        # Gradients: all-reduced at the step (0), reduce-scattered at the step (1) or after every
        # micro-batch (2); then the updated partitions all-gathered (1, 2).
        reduces = accum if stage == 2 else 1
        grads = (2 if stage == 0 else 1) * reduces * _ring_bytes(dp, whole * e)
        gather = _ring_bytes(dp, whole * e) if stage > 0 else 0.0
        out.dp = (grads + gather) / bandwidth
        out.lines.append(
            f"zero-{stage} over {dp} ({where}-node): gradients {grads / 1e9:.2f} GB"
            + (f" + weights all-gather {gather / 1e9:.2f} GB" if gather else "")
            + f", not overlapped = {out.dp:.3f} s"
        )
    elif dp > 1:
        gathers = 2 + (1 if p.activation_checkpoint == "full" else 0)
        volume = _ring_bytes(dp, whole * e)
        comm = (gathers * accum * volume + accum * volume) / bandwidth
        layers = max(cfg.model.n_layers, 1)
        out.dp = max(comm - compute * device.comm_overlap, comm / layers)
        out.lines.append(
            f"zero-3 over {dp} ({where}-node): {gathers} x {accum} gathers + {accum} "
            f"reduce-scatters of {volume / 1e9:.2f} GB = {comm:.3f} s, exposed {out.dp:.3f} s"
        )
    local = counts.trainable
    if not p.offload_optimizer:
        out.optimizer = local * 7 * _FP32 / (device.hbm_gbps * 1e9)
        out.lines.append(
            f"optimizer: {local:,} parameters in this rank's partition, memory-bound = "
            f"{out.optimizer:.3f} s"
        )
        return
    # Gradient partition to the host in float32 (as DeepSpeed copies it), weights back in the
    # training dtype; AdamW on the host over master weight, gradient and moments.
    link = local * (_FP32 + e) / (device.host_link_gbps * 1e9)
    adam = local * 7 * _FP32 / (device.host_memory_gbps * 1e9)
    fetch = 0.0
    if p.offload_params:  # each gather of a layer first copies the rank's partition up
        fetch = (3 if p.activation_checkpoint == "full" else 2) * accum * counts.params * e
        fetch /= device.host_link_gbps * 1e9
    out.optimizer = link + adam + fetch
    out.lines.append(
        f"optimizer offloaded: {local:,} parameters; host link {link:.3f} s"
        + (f" + parameter fetches {fetch:.3f} s" if fetch else "")
        + f" at {device.host_link_gbps:.0f} GB/s, host AdamW {adam:.3f} s at "
        f"{device.host_memory_gbps:.0f} GB/s = {out.optimizer:.3f} s"
    )


def _cp_time(
    cfg: Config,
    dims: ParallelDims,
    device: Device,
    gpus_per_node: int,
    micro_tokens: float,
    layers: float,
    accum: int,
    out: StepTime,
) -> float:
    m, p = cfg.model, cfg.parallel
    e = _bytes(cfg)
    k = resolved_head_dim(m)
    q_width, kv_width = m.n_heads * k / dims.tp, m.n_kv_heads * k / dims.tp
    inter = _spans_nodes(dims.cp, dims.tp, gpus_per_node)
    bandwidth = _bandwidth(device, inter)
    passes = 3 if p.activation_checkpoint == "full" else 2  # forward, (recompute), backward
    if p.cp_mode == "alltoall":
        per = _ring_bytes(dims.cp, micro_tokens * (2 * q_width + 2 * kv_width) * e)
        seconds = passes * layers * accum * per / bandwidth
        out.lines.append(
            f"cp all-to-all: {passes} x 4 exchanges per layer, {per / 1e6:.1f} MB per rank per "
            f"layer pass, not overlapped = {seconds:.3f} s"
        )
        return seconds
    kv = micro_tokens * 2 * kv_width * e
    # Forward (and recompute): cp - 1 passes of k, v; backward: k, v and their float32 gradient.
    per_layer = (passes - 1) * (dims.cp - 1) * kv + (dims.cp - 1) * kv + dims.cp * kv * _FP32 / e
    comm = layers * accum * per_layer / bandwidth
    attention_flops = 12.0 * m.n_heads * k * cfg.data.seq_len  # per token, forward + backward
    attention = (
        micro_tokens
        * attention_flops
        * layers
        * accum
        / dims.tp
        / (device.peak_tflops("bfloat16") * 1e12 * device.matmul_efficiency)
    )
    exposed = max(0.0, comm - attention)
    out.lines.append(
        f"cp ring over {dims.cp} ({'inter' if inter else 'intra'}-node): {comm:.3f} s of k/v "
        f"passes beside {attention:.3f} s of attention, exposed {exposed:.3f} s"
    )
    return exposed
