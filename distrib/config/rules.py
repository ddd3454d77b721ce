"""The derived values and constraints of a layout, one pure function each.

Every rule that both config validation and a builder need lives here once: validation calls it
before any process group starts, and the builder (the loader, the pipeline, float8, activation
checkpointing, ParallelDims) calls the same function, so the two can never disagree. Nothing
here imports torch; each function takes plain values or one config section and raises
`ConfigError` naming the keys and what would be valid.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys

from distrib.config.sections import ModelConfig, ParallelConfig, TrainingConfig
from distrib.errors import ConfigError

# Schedules that place several stages on each rank, looped (rank r holds r, r + pp, ...).
LOOPED_SCHEDULES = ("interleaved_1f1b", "zero_bubble")
AC_MODES = ("none", "full", "selective", "memory_budget")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_degree: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank; the global batch must divide
    into micro-batches over the data-parallel ranks."""
    per_step = micro_batch_size * dp_degree
    _check(
        global_batch_size > 0 and per_step > 0,
        f"training.global_batch_size ({global_batch_size}) and training.micro_batch_size "
        f"({micro_batch_size}) x data-parallel degree ({dp_degree}) must be positive",
    )
    if global_batch_size % per_step:
        valid = list(range(per_step, 4 * global_batch_size + 1, per_step))[:4]
        raise ConfigError(
            f"training.global_batch_size ({global_batch_size}) is not a multiple of "
            f"training.micro_batch_size ({micro_batch_size}) x data-parallel degree "
            f"({dp_degree}); valid global batch sizes include {valid}"
        )
    return global_batch_size // per_step


def grad_accum_steps(training: TrainingConfig, dp_degree: int) -> int:
    """`accumulation_steps` of the training section."""
    return accumulation_steps(training.global_batch_size, training.micro_batch_size, dp_degree)


def num_stages(parallel: ParallelConfig) -> int:
    """Pipeline stages in all: pp x stages per rank."""
    return max(parallel.pp, 1) * parallel.pp_stages_per_rank


def check_stages_per_rank(schedule: str, stages_per_rank: int) -> None:
    """Looped schedules hold two or more stages per rank, the others exactly one."""
    if schedule in LOOPED_SCHEDULES:
        _check(
            stages_per_rank >= 2,
            f"parallel.pp_schedule = '{schedule}' needs parallel.pp_stages_per_rank >= 2",
        )
    else:
        _check(
            stages_per_rank == 1,
            f"parallel.pp_stages_per_rank = {stages_per_rank} needs an interleaved schedule "
            f"({' or '.join(LOOPED_SCHEDULES)}); gpipe and 1f1b hold one stage per rank",
        )


def split_points(parallel: ParallelConfig, n_layers: int) -> list[int] | None:
    """The first layer of every stage after the first, from `parallel.pp_split_points` (None
    when empty: an even cut)."""
    if not parallel.pp_split_points:
        return None
    try:
        points = [int(x) for x in parallel.pp_split_points.split(",")]
    except ValueError:
        raise ConfigError(
            f"parallel.pp_split_points = '{parallel.pp_split_points}': expected comma-separated "
            "layer indices such as '4,8,12'"
        ) from None
    stages = num_stages(parallel)
    _check(
        len(points) == stages - 1,
        f"parallel.pp_split_points has {len(points)} point(s); {stages} stages need {stages - 1}",
    )
    _check(
        all(a < b for a, b in itertools.pairwise([0, *points, n_layers])),
        f"parallel.pp_split_points {points} must increase strictly within (0, {n_layers})",
    )
    return points


def stage_layers(n_layers: int, stages: int, points: list[int] | None = None) -> list[list[int]]:
    """Layer ids of each pipeline stage: cut at `points` (see `split_points`), or evenly.

    When the layers do not divide evenly the earlier stages take one extra each: the last stage
    already carries the output projection and the float32 loss, which on a real vocabulary cost
    as much as a layer or two, while the first stage's embedding is a lookup.
    """
    _check(
        1 <= stages <= n_layers,
        f"{stages} pipeline stages (parallel.pp x pp_stages_per_rank) exceed model.n_layers "
        f"({n_layers}); each stage needs at least one layer",
    )
    if points:
        bounds = [0, *points, n_layers]
        _check(
            len(points) == stages - 1 and all(a < b for a, b in itertools.pairwise(bounds)),
            f"split points {points} must be {stages - 1} strictly increasing layer indices "
            f"within (0, {n_layers})",
        )
    else:
        base, extra = divmod(n_layers, stages)
        sizes = [base + (s < extra) for s in range(stages)]
        bounds = [sum(sizes[:s]) for s in range(stages + 1)]
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def pipeline_microbatches(parallel: ParallelConfig, micro_batch_size: int) -> int:
    """Pipeline micro-batches per training micro-batch, checked against what the schedules of
    torch.distributed.pipelining accept."""
    n = parallel.pp_microbatches or micro_batch_size
    what = (
        f"{n} pipeline micro-batch(es) (parallel.pp_microbatches, else training.micro_batch_size)"
    )
    _check(
        micro_batch_size % n == 0,
        f"parallel.pp_microbatches ({n}) must divide training.micro_batch_size "
        f"({micro_batch_size}): each micro-batch is cut into that many pipeline micro-batches",
    )
    pp = parallel.pp
    if parallel.pp_schedule == "1f1b":
        _check(n >= pp, f"1f1b needs at least parallel.pp ({pp}) micro-batches; got {what}")
    if parallel.pp_schedule in LOOPED_SCHEDULES:
        rounds = max(1, n // pp)
        _check(
            n % rounds == 0,
            f"{parallel.pp_schedule} cannot split {what} over pp = {pp}: use a multiple of {pp}",
        )
    return n


def check_tied_embeddings(model: ModelConfig, tp: int, pp: int) -> None:
    """A tied embedding and head is one weight: it cannot live on two stages or in two layouts."""
    _check(
        not (model.tie_embeddings and (tp > 1 or pp > 1 or tp == -1 or pp == -1)),
        "model.tie_embeddings = true cannot be combined with parallel.tp or parallel.pp > 1 "
        "(the shared weight would live on two stages or in two layouts); untie the embeddings",
    )


def check_float8(engine: str, tp: int) -> None:
    """What training.float8 = true needs before any device is looked at."""
    _check(
        engine == "native" and tp == 1,
        f"training.float8 = true needs parallel.engine = 'native' and parallel.tp = 1 (got "
        f"parallel.engine = '{engine}', parallel.tp = {tp}: DeepSpeed and the tensor-parallel plan have no float8 "
        "linears); set training.float8 = false",
    )
    _check(
        _importable("torchao"),
        "training.float8 = true needs torchao (pip install torchao on a CUDA machine); "
        "set training.float8 = false",
    )


def _importable(name: str) -> bool:
    # A module already imported (or blocked with None, as tests do) has no spec to find.
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def check_activation_checkpoint(mode: str, memory_budget: float, compiled: bool) -> None:
    """The activation checkpointing mode, its memory budget, and what the budget mode needs."""
    _check(mode in AC_MODES, f"parallel.activation_checkpoint = '{mode}': valid: {AC_MODES}")
    _check(
        0.0 <= memory_budget <= 1.0,
        f"parallel.activation_memory_budget must be in [0, 1] (the share of activations to "
        f"keep), got {memory_budget}",
    )
    _check(
        mode != "memory_budget" or compiled,
        "parallel.activation_checkpoint = 'memory_budget' needs training.compile = true (the "
        "compiler chooses what to recompute); set training.compile = true or use 'selective'",
    )


# The linear layers LoRA can target, by attribute name (`lora.targets`); "all" is every one but
# the output head.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def lora_targets(targets: str) -> tuple[str, ...]:
    """`lora.targets` ("wq,wv", "all", "all,output") as target names, in LORA_TARGETS order."""
    names = {name.strip() for name in targets.split(",") if name.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(LORA_TARGETS[:-1])
    unknown = sorted(names - set(LORA_TARGETS))
    _check(
        bool(names) and not unknown,
        f"lora.targets = '{targets}': "
        + (f"unknown layer '{unknown[0]}'" if unknown else "no layer named")
        + f"; valid: {', '.join(LORA_TARGETS)}, or 'all' (every one but output), comma-separated",
    )
    return tuple(t for t in LORA_TARGETS if t in names)
