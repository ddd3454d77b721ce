"""The layouts `distrib plan` considers, each checked as `distrib train` would check it, then
predicted (memory and step time) and ranked.

Candidates: every tp (within a node) x cp x pp x data-parallel split of the GPUs, FSDP over all
the data-parallel ranks or HSDP with one shard group per node, for an MoE model every expert-
parallel degree that divides the experts and the shard ranks, each activation-checkpointing
mode, and micro-batch sizes 1, 2, 4, 8 (pipelines: multiples of pp). Where every GPU is a
data-parallel rank, DeepSpeed's ZeRO stages 0-3 too, with optimizer offload (stages 1-3) and
parameter offload (stage 3). The config's own validation and `ParallelDims` refuse what
training would refuse, so a listed layout is one that starts.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from distrib.config import Config
from distrib.config.validate import validate
from distrib.errors import ConfigError
from distrib.parallel.dims import ParallelDims
from distrib.planning.hardware import Device
from distrib.planning.memory import MemoryBreakdown, memory_breakdown
from distrib.planning.speed import StepTime, step_time
from distrib.planning.states import StateCounts, state_counts
from distrib.train.metrics import flops_per_token

AC_MODES = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)
NATIVE = -1
# (ZeRO stage, offload) pairs the DeepSpeed engine accepts (config validation).
DEEPSPEED = ((0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"))
DEEPSPEED += ((3, "none"), (3, "optimizer"), (3, "all"))
OFFLOADS = ("none", "optimizer", "all")


@dataclass(frozen=True)
class Layout:
    """One candidate: the parallel degrees, the checkpointing mode and the micro-batch."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ac: str
    micro_batch_size: int
    ep: int = 1
    zero: int = NATIVE  # the DeepSpeed ZeRO stage, or NATIVE for the native engine
    offload: str = "none"  # DeepSpeed: "optimizer", or "all" (optimizer and parameters)

    @property
    def label(self) -> str:
        """`--explain`'s spelling, e.g. dp_shard=8,tp=2,ac=full,mbs=2 (degrees of 1 left out;
        DeepSpeed layouts name their stage, e.g. dp_shard=8,zero=3,offload=optimizer,...)."""
        parts = [
            f"{k}={getattr(self, k)}"
            for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")
            if getattr(self, k) > 1
        ]
        if self.zero != NATIVE:
            parts.append(f"zero={self.zero}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        return ",".join([*parts, f"ac={self.ac}", f"mbs={self.micro_batch_size}"])

    def apply(self, cfg: Config) -> Config:
        """`cfg` with this layout (a copy)."""
        parallel = dataclasses.replace(
            cfg.parallel,
            dp_replicate=self.dp_replicate,
            dp_shard=self.dp_shard,
            cp=self.cp,
            tp=self.tp,
            pp=self.pp,
            ep=self.ep,
            activation_checkpoint=self.ac,
            engine="native" if self.zero == NATIVE else "deepspeed",
            zero_stage=cfg.parallel.zero_stage if self.zero == NATIVE else self.zero,
            offload_optimizer=self.offload in ("optimizer", "all"),
            offload_params=self.offload == "all",
        )
        training = dataclasses.replace(cfg.training, micro_batch_size=self.micro_batch_size)
        return dataclasses.replace(cfg, parallel=parallel, training=training)


def parse_layout(text: str) -> Layout:
    """A `Layout.label` back (the form `--explain` takes); unnamed degrees are 1."""
    names = {"dp_replicate", "dp_shard", "cp", "tp", "pp", "ep", "zero", "offload", "ac", "mbs"}
    values: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in names or not value:
            raise ConfigError(
                f"--explain {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                f"{sorted(names)} (e.g. dp_shard=8,tp=2,ac=full,mbs=2)"
            )
        values[key] = value
    axes = ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")
    try:
        degrees = {k: int(values.get(k, 1)) for k in axes}
        mbs = int(values.get("mbs", 1))
        zero = int(values.get("zero", NATIVE))
    except ValueError:
        raise ConfigError(f"--explain {text!r}: degrees, zero and mbs are whole numbers") from None
    ac = values.get("ac", "none")
    if ac not in AC_MODES:
        raise ConfigError(f"--explain {text!r}: ac must be one of {', '.join(AC_MODES)}")
    offload = values.get("offload", "none")
    if offload not in OFFLOADS:
        raise ConfigError(f"--explain {text!r}: offload must be one of {', '.join(OFFLOADS)}")
    return Layout(**degrees, ac=ac, micro_batch_size=mbs, zero=zero, offload=offload)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(gpus: int, gpus_per_node: int, experts: int = 0) -> Iterator[Layout]:
    """Every layout of the module docstring for `gpus` GPUs (not yet checked); `experts` is the
    model's routed experts per MoE layer (0: dense, no expert parallelism)."""
    for tp in (t for t in _divisors(gpus) if t <= gpus_per_node):
        for cp in _divisors(gpus // tp):
            for pp in _divisors(gpus // (tp * cp)):
                dp = gpus // (tp * cp * pp)
                per_node = gpus_per_node // (tp * cp) if gpus_per_node % (tp * cp) == 0 else 0
                splits = {(1, dp)}
                if 1 < per_node < dp and dp % per_node == 0:
                    splits.add((dp // per_node, per_node))  # HSDP: shards within a node
                engines = [(NATIVE, "none")]
                if tp == cp == pp == 1:
                    engines += DEEPSPEED  # DeepSpeed shards data-parallel only
                for replicate, shard in sorted(splits):
                    eps = [e for e in _divisors(shard) if experts % e == 0] if experts else [1]
                    for (zero, offload), ep in itertools.product(engines, eps):
                        if zero != NATIVE and (replicate > 1 or ep > 1):
                            continue
                        for ac, mbs in itertools.product(AC_MODES, MICRO_BATCHES):
                            if pp > 1 and mbs % pp:
                                continue
                            yield Layout(replicate, shard, cp, tp, pp, ac, mbs, ep, zero, offload)


@dataclass(frozen=True)
class Estimate:
    """A checked layout's predicted memory and speed on one device."""

    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    fits: bool


def check(cfg: Config, gpus: int) -> ParallelDims:
    """Refuse `cfg` as `distrib train` would at `gpus` processes (ConfigError), else its dims."""
    validate(cfg)
    dims = ParallelDims.from_config(cfg.parallel, gpus)
    dims.check_batch(cfg.training, cfg.parallel)
    return dims


def estimate(
    cfg: Config,
    layout: Layout,
    gpus: int,
    device: Device,
    gpus_per_node: int,
    counts: StateCounts | None = None,
) -> Estimate:
    """Predict one layout (ConfigError when training would refuse it)."""
    cfg = layout.apply(cfg)
    dims = check(cfg, gpus)
    counts = counts or state_counts(cfg, gpus)
    shards = dims.dp if layout.zero != NATIVE else dims.dp_shard * dims.cp
    memory = memory_breakdown(cfg, counts, dims.tp, dims.cp, dims.pp, shards)
    time = step_time(cfg, dims, counts, device, gpus_per_node)
    tokens = cfg.training.global_batch_size * cfg.data.seq_len / time.total / gpus
    peak = device.peak_tflops("bfloat16" if cfg.training.dtype == "bfloat16" else "float32")
    mfu = tokens * flops_per_token(cfg.model, cfg.data.seq_len) / (peak * 1e12)
    fits = memory.total / 1e9 + device.reserved_gb <= device.memory_gb
    return Estimate(layout, memory, time, tokens, mfu, fits)


def plan(cfg: Config, gpus: int, device: Device, gpus_per_node: int) -> list[Estimate]:
    """Every layout that training would accept, fastest first (those that fit before those
    that do not). State counts are taken once per set of degrees (they do not depend on the
    checkpointing mode or the micro-batch)."""
    counted: dict[tuple[int, ...], StateCounts] = {}
    out = []
    for layout in candidates(gpus, gpus_per_node, cfg.model.moe_experts):
        key = (
            *(layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp, layout.pp, layout.ep),
            *(layout.zero, layout.offload),
        )
        try:
            check(layout.apply(cfg), gpus)
        except ConfigError:
            continue
        if key not in counted:
            counted[key] = state_counts(layout.apply(cfg), gpus)
        out.append(estimate(cfg, layout, gpus, device, gpus_per_node, counted[key]))
    # Equal predicted speed: less recomputation first, then larger micro-batches (kernels run
    # fuller), then more memory to spare.
    return sorted(
        out,
        key=lambda e: (
            not e.fits,
            -round(e.tokens_per_s_per_gpu, 6),
            AC_MODES.index(e.layout.ac),
            -e.layout.micro_batch_size,
            e.memory.total,
        ),
    )
