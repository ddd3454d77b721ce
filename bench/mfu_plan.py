"""bench/mfu.py's matrix: the axes, the settings, why one cannot run here, and the plan.

The default plan is greedy: a baseline (the first value of every axis), then one axis at a time
varied from the best setting so far, then the best setting again in a fresh process; `full`
is the cartesian product. `run_plan` walks a plan with any `measure` function, so the walk is
testable without training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distrib.models.attention import resolve_backend

# Axis -> config key, in the order the plan varies them: what moves tokens/s most first, so a
# time budget that cuts the plan short cuts the rest. The chunked loss comes before the
# micro-batch because the memory it frees can let a larger micro-batch fit; a micro-batch that
# does not fit is retried under more checkpointing (AC_LEVELS), so checkpointing as an axis of
# its own, which only costs compute where memory suffices, can come last.
AXES = {
    "compile": "training.compile",
    "loss_chunk_tokens": "training.loss_chunk_tokens",
    "micro_batch_size": "training.micro_batch_size",
    "float8": "training.float8",
    "attention": "model.attention",
    "activation_checkpoint": "parallel.activation_checkpoint",
}
# The out-of-memory ladder, least recomputation first.
AC_LEVELS = ("none", "selective", "full")
AC_VALUES = (*AC_LEVELS, "memory_budget")  # memory_budget: the config's default budget


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

    @classmethod
    def detect(cls, device_type: str, dtype: str, global_batch_size: int) -> Context:
        try:
            resolve_backend("flash", device_type)
            flash = None
        except ValueError as err:
            flash = str(err)
        torchao = None
        if importlib.util.find_spec("torchao") is None:
            torchao = "torchao is not importable (pip install torchao)"
        return cls(device_type, dtype, global_batch_size, flash, torchao)


def value_reason(axis: str, value: Any, ctx: Context) -> str | None:
    """Why `axis = value` cannot run in `ctx`; None when it can."""
    if axis == "attention" and value == "flash":
        if ctx.flash_missing:
            return ctx.flash_missing
        if ctx.dtype != "bfloat16":
            return f"flash_attn needs bfloat16; this run trains in {ctx.dtype}"
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
    from the best setting so far, or (name "best") the best setting run once more."""

    name: str
    axis: str | None = None
    values: list[Any] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # value -> reason
    settings: list[Setting] = dataclasses.field(default_factory=list)


def axis_values(mbs: list[int], chunk: int, axes: list[str]) -> dict[str, list[Any]]:
    """Every axis's values, baseline first; an axis not in `axes` keeps its baseline only."""
    values: dict[str, list[Any]] = {
        "compile": [False, True],
        "attention": ["sdpa", "eager", "flash"],
        "loss_chunk_tokens": [0, chunk],
        "float8": [False, True],
        "activation_checkpoint": list(AC_VALUES),
        "micro_batch_size": mbs,
    }
    return {a: v if a in axes else v[:1] for a, v in values.items()}


def build_plan(values: dict[str, list[Any]], ctx: Context, full: bool = False) -> list[Stage]:
    """The default greedy plan (baseline, one stage per axis, best again), or the product."""
    baseline = Setting(**{a: v[0] for a, v in values.items()})
    if full:
        product = [
            Setting(**dict(zip(AXES, p, strict=True)))
            for p in itertools.product(*(values[a] for a in AXES))
        ]
        return [Stage("full", settings=product)]
    plan = [Stage("baseline", settings=[baseline])]
    for axis in AXES:
        rest = values[axis][1:]
        if rest:
            skipped = {str(v): r for v in rest if (r := value_reason(axis, v, ctx))}
            plan.append(Stage(axis, axis=axis, values=rest, skipped=skipped))
    plan.append(Stage("best"))
    return plan


# --- running the plan --------------------------------------------------------------------------

Measure = Callable[[Setting, str], dict[str, Any]]


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured row with the most tokens/s, the "best" stage's re-run left out."""
    ok = [r for r in rows if r["status"] == "ok" and r["stage"] != "best"]
    return max(ok, key=lambda r: r["tokens_per_s"], default=None)


def run_plan(plan: list[Stage], ctx: Context, measure: Measure) -> list[dict[str, Any]]:
    """Walk the plan; a setting that cannot run here is recorded as skipped with its reason.
    In the micro-batch stage an out-of-memory size is tried again under more checkpointing."""
    rows: list[dict[str, Any]] = []
    done: set[Setting] = set()

    def attempt(setting: Setting, stage: str) -> dict[str, Any] | None:
        if setting in done and stage != "best":
            return None  # already measured in an earlier stage
        done.add(setting)
        reason = skip_reason(setting, ctx)
        row = measure(setting, stage) if reason is None else skipped_row(setting, stage, reason)
        rows.append(row)
        return row

    baseline = plan[0].settings[0] if plan and plan[0].settings else Setting()
    for stage in plan:
        for setting in stage.settings:
            attempt(setting, stage.name)
        best = best_row(rows)
        base = best["setting_obj"] if best else baseline
        if stage.axis:
            for value in stage.values:
                setting = dataclasses.replace(base, **{stage.axis: value})
                row = attempt(setting, stage.name)
                if stage.axis != "micro_batch_size":
                    continue
                for ac in ac_ladder_after(setting.activation_checkpoint):
                    if row is None or row["status"] != "oom":
                        break
                    setting = dataclasses.replace(setting, activation_checkpoint=ac)
                    row = attempt(setting, stage.name)
        elif stage.name == "best" and best:
            attempt(base, "best")
    return rows


def ac_ladder_after(ac: str) -> tuple[str, ...]:
    """The checkpointing levels an out-of-memory setting is retried under, after `ac`: the
    next ones of AC_LEVELS; after memory_budget (between selective and full), full."""
    if ac not in AC_LEVELS:
        return AC_LEVELS[-1:]
    return AC_LEVELS[AC_LEVELS.index(ac) + 1 :]


def skipped_row(setting: Setting, stage: str, reason: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "setting": dataclasses.asdict(setting),
        "setting_obj": setting,
        "status": "skipped",
        "reason": reason,
    }
