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

Legend: N world size, T tokens, D model dim, e bytes per element of the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distrib.config import Config
from distrib.config.families import resolved_head_dim
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
    tp: float = 0.0
    cp: float = 0.0
    dp: float = 0.0
    optimizer: float = 0.0
    lines: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp + self.cp + self.dp + self.optimizer


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


def step_time(
    cfg: Config, dims: ParallelDims, counts: StateCounts, device: Device, gpus_per_node: int
) -> StepTime:
    """Predicted step time of `cfg` under `dims` on `device` (see the module docstring)."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    out = StepTime()
    e = 2 if t.dtype == "bfloat16" else _FP32
    n = dims.world_size
    seq = cfg.data.seq_len
    step_tokens = t.global_batch_size * seq
    per_token = flops_per_token(m, seq)
    # Float8 runs the block linears (not the output head, not attention) at the float8 rate.
    head = 6.0 * m.vocab_size * m.dim
    linear = 6.0 * active_matmul_params(m) - head
    other = per_token - linear
    if p.activation_checkpoint == "full":  # the blocks' forward once more in backward
        recompute = 1.0 + 1.0 / 3.0
        linear, other = linear * recompute, head + (other - head) * recompute
    rate = device.peak_tflops(t.dtype if t.dtype == "bfloat16" else "float32") * 1e12
    base = rate * device.matmul_efficiency
    if t.float8:
        fast = device.peak_fp8_tflops * 1e12 * device.float8_efficiency
        seconds_per_token = linear / fast + other / base
    else:
        seconds_per_token = (linear + other) / base
    out.compute = step_tokens * seconds_per_token / n
    out.lines.append(
        f"compute: {step_tokens:,} tokens x {per_token / 1e9:.2f} GFLOP/token / {n} GPUs at "
        f"{device.matmul_efficiency:.0%} of {rate / 1e12:.0f} TFLOP/s"
        + (
            f", block linears in float8 at {device.float8_efficiency:.0%} of "
            f"{device.peak_fp8_tflops:.0f}"
            if t.float8
            else ""
        )
        + (", + one forward recomputed" if p.activation_checkpoint == "full" else "")
        + f" = {out.compute:.3f} s"
    )
    accum = grad_accum_steps(t, dims.dp)
    micro_tokens = t.micro_batch_size * seq / dims.cp  # one micro-batch, on one cp rank
    layers = m.n_layers / dims.pp
    if dims.pp > 1:
        pipe_micro = accum * pipeline_microbatches(p, t.micro_batch_size)
        out.bubble = out.compute * (dims.pp - 1) / (pipe_micro * p.pp_stages_per_rank)
        out.lines.append(
            f"pipeline bubble: (pp {dims.pp} - 1) / ({pipe_micro} micro-batches x "
            f"{p.pp_stages_per_rank} stages per rank) of compute = {out.bubble:.3f} s"
        )
    recomputes = p.activation_checkpoint == "full"
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
    shards = dims.dp_shard * dims.cp
    compute = out.compute + out.bubble
    weights = counts.total_params / (dims.tp * dims.pp)
    if shards > 1:
        inter = _spans_nodes(shards, dims.tp, gpus_per_node)
        gathers = (2 + (1 if recomputes else 0)) * accum * _ring_bytes(shards, weights * e)
        scatter = _ring_bytes(shards, weights * _FP32)
        fsdp = (gathers + scatter) / _bandwidth(device, inter)
        exposed = max(fsdp - compute, fsdp / max(layers, 1))
        out.dp += exposed
        out.lines.append(
            f"fsdp over {shards} ranks ({'inter' if inter else 'intra'}-node): gathers "
            f"{gathers / 1e9:.2f} GB + reduce-scatter {scatter / 1e9:.2f} GB = {fsdp:.3f} s, "
            f"exposed {exposed:.3f} s"
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
    # AdamW reads parameter, gradient and both moments and writes three of them: 7 x 4 bytes.
    out.optimizer = counts.trainable * 7 * _FP32 / (device.hbm_gbps * 1e9)
    out.lines.append(
        f"optimizer: {counts.trainable:,} local parameters, memory-bound = {out.optimizer:.3f} s"
    )
    return out


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
    e = 2 if cfg.training.dtype == "bfloat16" else _FP32
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
