"""bench/mfu.py's matrix: the axes, the settings, why one cannot run here, and the plan.

The default plan tries the likeliest winner first: compile on, the chunked loss, the fastest
attention backend that runs here and the largest micro-batch that fits (an out-of-memory size
is retried under selective checkpointing, then the next smaller size). Then one axis at a time
is varied from the best setting so far, the baseline (the first value of every axis) is measured
as the reference, and the best setting runs again in a fresh process. A time limit that cuts the
plan short thus cuts the confirmations, not the likely best. `full` is the cartesian product.
`run_plan` walks a plan with any `measure` function, so the walk is testable without training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distrib.models.attention import BACKENDS, resolve_backend

# Axis -> config key (the order of the `--section.key=value` overrides and of the product).
AXES = {
    "compile": "training.compile",
    "loss_chunk_tokens": "training.loss_chunk_tokens",
    "micro_batch_size": "training.micro_batch_size",
    "float8": "training.float8",
    "attention": "model.attention",
    "activation_checkpoint": "parallel.activation_checkpoint",
}
# After the likely best, the axes varied one at a time, in this order: the attention backend
# and the micro-batch (the likeliest to move tokens/s), float8 (a gain on Hopper's float8 tensor
# cores, but the newest code path), then the confirmations that chunking and compile pay, and
# checkpointing, which only costs compute where memory suffices.
STAGE_ORDER = (
    "attention",
    "micro_batch_size",
    "float8",
    "loss_chunk_tokens",
    "compile",
    "activation_checkpoint",
)
# Values known to be slow, measured only as references after every other axis: eager attention
# materializes float32 [L, L] scores (at seq 4096 the likeliest row to run out of memory).
REFERENCE_VALUES = {"attention": ("eager",)}
# The out-of-memory ladder, least recomputation first.
AC_LEVELS = ("none", "selective", "full")
AC_VALUES = (*AC_LEVELS, "memory_budget")  # memory_budget: the config's default budget
# A backend of distrib.models.attention that pins SDPA to cuDNN first, where it has one (a name
# holding "cudnn"). Without one the axis cannot measure cuDNN on its own: `sdpa` pins FLASH >
# CUDNN > EFFICIENT, so PyTorch's FlashAttention-2 kernel is what runs under it on Hopper.
CUDNN_BACKEND = next((b for b in BACKENDS if "cudnn" in b), None)
# Attention backends, likeliest fastest first (cuDNN is often ahead of FlashAttention-2 on Hopper
# for head dim 128, causal, bf16); eager materializes [L, L] scores and is the slowest.
FAST_ATTENTION = (*([CUDNN_BACKEND] if CUDNN_BACKEND else []), "flash", "sdpa", "eager")
# Values that need 16-bit inputs (the fused kernels take no float32).
HALF_ONLY = {"flash", *([CUDNN_BACKEND] if CUDNN_BACKEND else [])}
# Statuses of a planned row that did not get measured: a plan with one is incomplete.
NOT_MEASURED = ("not_run", "timeout")


@dataclass(frozen=True)
class Setting:
    """One point of the matrix; fields are named as the AXES."""

    compile: bool = False
    attention: str = "sdpa"
    loss_chunk_tokens: int = 0
    float8: bool = False
    activation_checkpoint: str = "none"
    micro_batch_size: int = 8

    def overrides(self) -> list[str]:
        """The `--section.key=value` arguments that select this setting."""
        out = []
        for axis, key in AXES.items():
            value = getattr(self, axis)
            out.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out

    def label(self) -> str:
        names = ("compile", "attn", "chunk", "fp8", "ac", "mb")
        return " ".join(f"{n}={c}" for n, c in zip(names, self.cells(), strict=True))

    def cells(self) -> list[str]:
        return [
            "on" if self.compile else "off",
            self.attention,
            str(self.loss_chunk_tokens or "-"),
            "on" if self.float8 else "off",
            self.activation_checkpoint,
            str(self.micro_batch_size),
        ]


@dataclass(frozen=True)
class Context:
    """What decides, before anything runs, that a value cannot run here (and why)."""

    device_type: str
    dtype: str
    global_batch_size: int
    flash_missing: str | None  # why flash_attn cannot run, None when it can
    torchao_missing: str | None
    cudnn_missing: str | None = None  # why CUDNN_BACKEND cannot run (None: it can, or none)

    @classmethod
    def detect(cls, device_type: str, dtype: str, global_batch_size: int) -> Context:
        flash = backend_missing("flash", device_type)
        cudnn = backend_missing(CUDNN_BACKEND, device_type) if CUDNN_BACKEND else None
        torchao = None
        if importlib.util.find_spec("torchao") is None:
            torchao = "torchao is not importable (pip install torchao)"
        return cls(device_type, dtype, global_batch_size, flash, torchao, cudnn)


def backend_missing(name: str, device_type: str) -> str | None:
    """Why attention backend `name` cannot run on `device_type` (None: it can)."""
    try:
        resolve_backend(name, device_type)
    except ValueError as err:
        return str(err)
    if device_type != "cuda" and name in HALF_ONLY:
        return f"attention backend '{name}' needs a CUDA device, not '{device_type}'"
    return None


def value_reason(axis: str, value: Any, ctx: Context) -> str | None:
    """Why `axis = value` cannot run in `ctx`; None when it can."""
    if axis == "attention" and value in HALF_ONLY:
        missing = ctx.flash_missing if value == "flash" else ctx.cudnn_missing
        if missing:
            return missing
        if ctx.dtype != "bfloat16":
            return f"attention backend '{value}' needs bfloat16; this run trains in {ctx.dtype}"
    if axis == "float8" and value:
        missing = [] if ctx.device_type == "cuda" else [f"float8 needs CUDA, not {ctx.device_type}"]
        missing += [ctx.torchao_missing] if ctx.torchao_missing else []
        return "; ".join(missing) or None
    if axis == "micro_batch_size" and ctx.global_batch_size % value:
        return f"global_batch_size {ctx.global_batch_size} is not a multiple of {value}"
    return None


def skip_reason(setting: Setting, ctx: Context) -> str | None:
    """Why `setting` cannot run in `ctx`: one of its values, or two that do not combine."""
    reasons = (value_reason(a, getattr(setting, a), ctx) for a in AXES)
    reason = next((r for r in reasons if r), None)
    if reason is None and setting.activation_checkpoint == "memory_budget" and not setting.compile:
        reason = "activation_checkpoint = memory_budget needs compile (the compiler picks)"
    return reason


@dataclass
class Stage:
    """A step of the plan: fixed `settings` (baseline, full), or `values` of `axis` each tried
    from the best setting so far (from `start` where set), or (name "best") the best setting
    run once more. `first_fit`: stop at the first value that does not run out of memory."""

    name: str
    axis: str | None = None
    values: list[Any] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # value -> reason
    settings: list[Setting] = dataclasses.field(default_factory=list)
    start: Setting | None = None
    first_fit: bool = False


def axis_values(mbs: list[int], chunk: int, axes: list[str]) -> dict[str, list[Any]]:
    """Every axis's values, baseline first; an axis not in `axes` keeps its baseline only."""
    values: dict[str, list[Any]] = {
        "compile": [False, True],
        "attention": ["sdpa", *([CUDNN_BACKEND] if CUDNN_BACKEND else []), "flash", "eager"],
        "loss_chunk_tokens": [0, chunk],
        "float8": [False, True],
        "activation_checkpoint": list(AC_VALUES),
        "micro_batch_size": mbs,
    }
    return {a: v if a in axes else v[:1] for a, v in values.items()}


def preferred(axis: str, values: list[Any]) -> list[Any]:
    """`values` of `axis`, the likeliest fastest first: compile on, the chunked loss, the
    largest micro-batch, the attention of FAST_ATTENTION's order; float8 off (varied later, as
    the newest code path) and no checkpointing (it only adds compute)."""
    if axis == "compile":
        return sorted(values, reverse=True)
    if axis == "loss_chunk_tokens":
        return sorted(values, key=lambda v: v == 0)
    if axis == "micro_batch_size":
        return sorted(values, reverse=True)
    if axis == "attention":
        rank = {name: i for i, name in enumerate(FAST_ATTENTION)}
        return sorted(values, key=lambda v: rank.get(v, len(rank)))
    return list(values)  # float8 and activation_checkpoint: baseline (off, none) first


def likely_best(values: dict[str, list[Any]], ctx: Context) -> Setting:
    """Each axis's likeliest fastest value that can run here."""
    pick = {}
    for axis, vals in values.items():
        ordered = preferred(axis, vals)
        pick[axis] = next((v for v in ordered if not value_reason(axis, v, ctx)), ordered[0])
    return Setting(**pick)


def build_plan(values: dict[str, list[Any]], ctx: Context, full: bool = False) -> list[Stage]:
    """The default plan (the likely best, one stage per axis, the baseline, the best again), or
    the product."""
    baseline = Setting(**{a: v[0] for a, v in values.items()})
    if full:
        product = [
            Setting(**dict(zip(AXES, p, strict=True)))
            for p in itertools.product(*(values[a] for a in AXES))
        ]
        return [Stage("full", settings=product)]
    guess = likely_best(values, ctx)
    sizes = preferred("micro_batch_size", values["micro_batch_size"])
    fits = [m for m in sizes if m <= guess.micro_batch_size]
    plan = [Stage("likely_best", "micro_batch_size", fits, start=guess, first_fit=True)]
    late: list[Stage] = []  # the known-slow references, after every other axis
    for axis in STAGE_ORDER:
        rest = [v for v in preferred(axis, values[axis]) if v != getattr(guess, axis)]
        if axis == "micro_batch_size":
            rest = fits[1:]  # the sizes above the guess cannot run; the guess is measured
        slow = [v for v in rest if v in REFERENCE_VALUES.get(axis, ())]
        plan += axis_stage(axis, [v for v in rest if v not in slow], ctx)
        late += axis_stage(axis, slow, ctx)
    return [*plan, *late, Stage("baseline", settings=[baseline]), Stage("best")]


def axis_stage(axis: str, values: list[Any], ctx: Context) -> list[Stage]:
    """The stage varying `axis` over `values` (none without values), with skip reasons."""
    if not values:
        return []
    skipped = {str(v): r for v in values if (r := value_reason(axis, v, ctx))}
    return [Stage(axis, axis=axis, values=values, skipped=skipped)]


# --- running the plan --------------------------------------------------------------------------

Measure = Callable[[Setting, str], dict[str, Any]]
OnRow = Callable[[list[dict[str, Any]]], None]


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured row with the most tokens/s, the "best" stage's re-run left out."""
    ok = [r for r in rows if r["status"] == "ok" and r["stage"] != "best"]
    return max(ok, key=lambda r: r["tokens_per_s"], default=None)


def plan_complete(rows: list[dict[str, Any]]) -> bool:
    """Every planned row measured (ok, oom, error) or skipped with its reason: none left
    unmeasured by a time limit (not_run) or cut off by its timeout."""
    return bool(rows) and all(r["status"] not in NOT_MEASURED for r in rows)


class Walk:
    """Walks a plan: each setting measured once (the "best" re-run aside), a setting that
    cannot run here recorded as skipped with its reason, `on_row` called after every row."""

    def __init__(self, ctx: Context, measure: Measure, on_row: OnRow | None = None) -> None:
        self.ctx, self.measure, self.on_row = ctx, measure, on_row
        self.rows: list[dict[str, Any]] = []
        self.done: set[Setting] = set()

    def attempt(self, setting: Setting, stage: str) -> dict[str, Any] | None:
        """The row of `setting`; None when an earlier stage measured it."""
        if setting in self.done and stage != "best":
            return None
        self.done.add(setting)
        reason = skip_reason(setting, self.ctx)
        if reason is None:
            row = self.measure(setting, stage)
        else:
            row = skipped_row(setting, stage, reason)
        self.rows.append(row)
        if self.on_row:
            self.on_row(self.rows)
        return row

    def ladder(self, setting: Setting, stage: str, levels: tuple[str, ...]) -> dict | None:
        """`setting`, and while it runs out of memory, again under each of `levels`."""
        row = self.attempt(setting, stage)
        for ac in levels:
            if row is None or row["status"] != "oom":
                break
            row = self.attempt(dataclasses.replace(setting, activation_checkpoint=ac), stage)
        return row

    def axis_stage(self, stage: Stage, base: Setting) -> None:
        assert stage.axis is not None
        for value in stage.values:
            setting = dataclasses.replace(stage.start or base, **{stage.axis: value})
            if stage.axis != "micro_batch_size":
                self.attempt(setting, stage.name)
                continue
            # A size that runs out of memory is retried under more checkpointing; the likely
            # best stops at selective, then tries the next smaller size.
            setting = dataclasses.replace(setting, activation_checkpoint=AC_LEVELS[0])
            levels = AC_LEVELS[1:2] if stage.first_fit else AC_LEVELS[1:]
            row = self.ladder(setting, stage.name, levels)
            if stage.first_fit and row is not None and row["status"] not in ("oom", "skipped"):
                break

    def run(self, plan: list[Stage], baseline: Setting) -> list[dict[str, Any]]:
        for stage in plan:
            for setting in stage.settings:
                self.attempt(setting, stage.name)
            best = best_row(self.rows)
            base = best["setting_obj"] if best else baseline
            if stage.axis:
                self.axis_stage(stage, base)
            elif stage.name == "best" and best:
                self.attempt(base, "best")
        return self.rows


def run_plan(
    plan: list[Stage], ctx: Context, measure: Measure, on_row: OnRow | None = None
) -> list[dict[str, Any]]:
    """Walk the plan (see `Walk`); the rows in the order they ran."""
    baseline = next((s.settings[0] for s in plan if s.name == "baseline"), Setting())
    return Walk(ctx, measure, on_row).run(plan, baseline)


def skipped_row(setting: Setting, stage: str, reason: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "setting": dataclasses.asdict(setting),
        "setting_obj": setting,
        "status": "skipped",
        "reason": reason,
    }
