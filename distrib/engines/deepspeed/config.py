"""The distrib config as a DeepSpeed config: translation, the user's JSON overrides, checks.

Pure functions of the config: no DeepSpeed import, so they are unit-tested on any machine.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distrib.config import Config, ParallelConfig, TrainingConfig
from distrib.config.rules import grad_accum_steps
from distrib.errors import ConfigError

# Keys distrib itself depends on (the loader is sized by the batch keys; the accept veto and the
# schedule assume no loss scaling): an override may repeat them but not change them.
_OWNED = {
    ("train_micro_batch_size_per_gpu",): "training.micro_batch_size",
    ("gradient_accumulation_steps",): "training.global_batch_size / training.micro_batch_size",
    ("train_batch_size",): "training.global_batch_size",
    ("bf16", "enabled"): "training.dtype",
    ("fp16", "enabled"): "training.dtype (fp16 loss scaling is not supported; use bfloat16)",
}
AUTO = "auto"
# Sections that would replace the optimizer and schedule distrib builds from training.*.
_REFUSED = {
    "optimizer": "training.lr, beta1, beta2, eps, weight_decay",
    "scheduler": "training.schedule, warmup_steps, min_lr, decay_fraction",
}


def ds_config(
    training: TrainingConfig, parallel: ParallelConfig, dp_size: int, device_type: str = "cpu"
) -> dict[str, Any]:
    """The DeepSpeed config equivalent to distrib's: batch sizes, clipping, dtype, ZeRO stage and
    offload. Pure: no DeepSpeed import, so it is unit-tested on its own."""
    accum = grad_accum_steps(training, dp_size)
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    # Pinned host memory speeds up host-device copies; on a CPU-only machine there are none.
    pin = device_type == "cuda"
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": training.max_grad_norm,
        "bf16": {"enabled": training.dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # Our AdamW (the native engine's, for identical numerics) is not on DeepSpeed's list of
        # tested ZeRO optimizers; it is a plain torch.optim.AdamW.
        "zero_allow_untested_optimizer": True,
        # distrib logs every step itself (metrics.jsonl); DeepSpeed's own progress lines are noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s values on top; nested dicts merge key by key, anything else
    (lists included) is replaced whole. A value "auto" (as in configs written for the Hugging
    Face Trainer) keeps `base`'s value, or leaves the key out where `base` has none."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value == AUTO:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, Mapping):
            merged[key] = deep_merge({}, value)  # drops its "auto" values too
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _lookup(d: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def check_overrides(translated: Mapping[str, Any], merged: Mapping[str, Any], source: str) -> None:
    """Refuse overrides that would contradict what distrib's loader, schedule and veto assume."""
    for key, owner in _REFUSED.items():
        if key in merged:
            raise ConfigError(
                f"{source}: the '{key}' section is not supported with parallel.engine = "
                f"'deepspeed'; distrib builds it from {owner}"
            )
    for path, owner in _OWNED.items():
        want, got = _lookup(translated, path), _lookup(merged, path)
        if got != want:
            raise ConfigError(
                f"{source}: {'.'.join(path)} = {got!r} contradicts the distrib config ({want!r}, "
                f"from {owner}); set it there instead"
            )
    stage = _lookup(merged, ("zero_optimization", "stage"))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if _offloads(merged, "offload_param") and stage != 3:
        raise ConfigError(f"{source}: zero_optimization.offload_param needs stage 3, got {stage}")
    if _offloads(merged, "offload_optimizer") and stage == 0:
        raise ConfigError(f"{source}: zero_optimization.offload_optimizer needs stage >= 1")


def effective_config(cfg: Config, dp_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """`ds_config` with the `parallel.deepspeed_config` JSON (if any) merged over it."""
    translated = ds_config(cfg.training, cfg.parallel, dp_size, device_type)
    path = cfg.parallel.deepspeed_config
    if not path:
        return translated
    source = f"parallel.deepspeed_config ({path})"
    try:
        override = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{source}: cannot read it as JSON: {err}") from None
    if not isinstance(override, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(override).__name__}")
    merged = deep_merge(translated, override)
    check_overrides(translated, merged, source)
    return merged


def zero_stage(config: Mapping[str, Any]) -> int:
    """The effective ZeRO stage (0 when the config has none)."""
    return int(_lookup(config, ("zero_optimization", "stage")) or 0)


def _offloads(config: Mapping[str, Any], what: str) -> bool:
    return _lookup(config, ("zero_optimization", what, "device")) not in (None, "none")


def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    """Whether DeepSpeed keeps the optimizer on the host (or NVMe): it then needs its CPU Adam."""
    return _offloads(config, "offload_optimizer")
