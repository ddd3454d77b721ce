"""The DeepSpeed engine's config (translation from distrib's keys, the JSON override merge, what
an override may not change) and its update gate. No DeepSpeed needed, one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distrib.config import Config, TrainingConfig, load_config
from distrib.engines.deepspeed.config import (
    deep_merge,
    ds_config,
    effective_config,
    offloads_optimizer,
    zero_stage,
)
from distrib.engines.deepspeed.gate import UpdateGate, install_gate
from distrib.engines.optim import build_scheduler
from distrib.errors import ConfigError

DS = ["--parallel.engine=deepspeed", "--parallel.dp_shard=-1"]


def _cfg(*overrides: str) -> Config:
    return load_config(None, [*DS, *overrides])


def test_translation_of_batch_clipping_dtype_and_stage() -> None:
    cfg = _cfg(
        "--training.global_batch_size=32",
        "--training.micro_batch_size=4",
        "--training.max_grad_norm=0.5",
        "--training.dtype=bfloat16",
        "--parallel.zero_stage=3",
    )
    got = ds_config(cfg.training, cfg.parallel, dp_size=2)
    assert got["train_batch_size"] == 32
    assert got["train_micro_batch_size_per_gpu"] == 4
    assert got["gradient_accumulation_steps"] == 4  # 32 / (4 x 2 ranks)
    assert got["gradient_clipping"] == 0.5
    assert got["bf16"] == {"enabled": True}
    assert got["fp16"] == {"enabled": False}
    assert got["zero_optimization"] == {"stage": 3}
    assert got["zero_allow_untested_optimizer"] is True


def test_float32_and_no_clipping() -> None:
    cfg = _cfg("--training.max_grad_norm=0", "--parallel.zero_stage=0")
    got = ds_config(cfg.training, cfg.parallel, dp_size=1)
    assert got["bf16"] == {"enabled": False}
    assert got["gradient_clipping"] == 0.0  # DeepSpeed clips only above 0
    assert zero_stage(got) == 0


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_offload_sections(device_type: str) -> None:
    cfg = _cfg(
        "--parallel.zero_stage=3",
        "--parallel.offload_optimizer=true",
        "--parallel.offload_params=true",
    )
    zero = ds_config(cfg.training, cfg.parallel, 2, device_type)["zero_optimization"]
    pin = device_type == "cuda"  # pinned host memory only helps host-device copies
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": pin}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": pin}
    assert offloads_optimizer({"zero_optimization": zero})


def test_no_offload_sections_by_default() -> None:
    cfg = _cfg("--parallel.zero_stage=2")
    got = ds_config(cfg.training, cfg.parallel, 2)
    assert set(got["zero_optimization"]) == {"stage"}
    assert not offloads_optimizer(got)


def test_batch_that_does_not_divide_is_refused() -> None:
    cfg = _cfg("--training.global_batch_size=8", "--training.micro_batch_size=4")
    with pytest.raises(ConfigError, match="global_batch_size"):
        ds_config(cfg.training, cfg.parallel, dp_size=3)


def test_deep_merge_nests_replaces_and_copies() -> None:
    base = {"a": 1, "z": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "l": [1, 2]}
    override = {"z": {"overlap_comm": True, "offload_optimizer": {"pin_memory": True}}, "l": [3]}
    merged = deep_merge(base, override)
    assert merged == {
        "a": 1,
        "z": {
            "stage": 2,
            "overlap_comm": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        },
        "l": [3],  # lists are replaced, not appended to
    }
    merged["z"]["stage"] = 3
    assert base["z"]["stage"] == 2  # the inputs are never modified


def test_deep_merge_auto_keeps_the_translated_value() -> None:
    base = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    override = {
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto"},
        "new": {"x": "auto", "y": 1},
    }
    assert deep_merge(base, override) == {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 2},
        "new": {"y": 1},
    }


def _with_json(tmp_path: Path, doc: object, *overrides: str) -> Config:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc))
    return _cfg(f"--parallel.deepspeed_config={path}", *overrides)


def test_effective_config_applies_overrides(tmp_path: Path) -> None:
    doc = {
        "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000},
        "gradient_clipping": 0.3,
        "train_micro_batch_size_per_gpu": 2,  # repeating distrib's value is fine
    }
    cfg = _with_json(tmp_path, doc, "--parallel.zero_stage=1", "--training.micro_batch_size=2")
    got = effective_config(cfg, dp_size=2)
    assert got["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": 1000,
    }
    assert got["gradient_clipping"] == 0.3
    assert got["train_micro_batch_size_per_gpu"] == 2


def test_effective_config_without_json_is_the_translation() -> None:
    cfg = _cfg("--parallel.zero_stage=1")
    assert effective_config(cfg, 2) == ds_config(cfg.training, cfg.parallel, 2)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"optimizer": {"type": "Adam"}}, "'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
        ({"train_micro_batch_size_per_gpu": 8}, "training.micro_batch_size"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
        ({"train_batch_size": 64}, "training.global_batch_size"),
        ({"bf16": {"enabled": True}}, "training.dtype"),
        ({"fp16": {"enabled": True}}, "fp16 loss scaling"),
        ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "needs stage 3"),
        (
            {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
            "needs stage >= 1",
        ),
    ],
)
def test_overrides_that_contradict_distrib_are_refused(
    tmp_path: Path, doc: dict, message: str
) -> None:
    cfg = _with_json(
        tmp_path, doc, "--training.global_batch_size=32", "--training.micro_batch_size=4"
    )
    with pytest.raises(ConfigError, match=message):
        effective_config(cfg, dp_size=2)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_or_non_object_json_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(text)
    cfg = _cfg(f"--parallel.deepspeed_config={path}")
    with pytest.raises(ConfigError, match="parallel.deepspeed_config"):
        effective_config(cfg, dp_size=2)


def _optimizer() -> tuple[torch.nn.Parameter, torch.optim.AdamW, UpdateGate]:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1)
    gate = UpdateGate()
    install_gate(optimizer, gate)
    return param, optimizer, gate


def test_gate_is_closed_outside_a_step() -> None:
    # DeepSpeed's bf16 ZeRO-0 wrapper steps once with zero gradients when it is built: that step
    # must not count in AdamW's bias correction nor decay the weights.
    param, optimizer, _ = _optimizer()
    param.grad = torch.zeros(3)
    optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3))
    assert optimizer.state[param] == {}


def test_gate_asks_once_per_step_and_a_refusal_changes_nothing() -> None:
    param, optimizer, gate = _optimizer()
    scheduler = build_scheduler(optimizer, TrainingConfig(lr=0.1, warmup_steps=0, steps=10))
    asked: list[int] = []
    gate.reset(lambda: asked.append(1) or False)
    param.grad = torch.ones(3)
    for _ in range(3):  # ZeRO-3 steps the base optimizer once per parameter sub-group
        optimizer.step()
    scheduler.step()  # the schedule still advances, and torch sees a step before it (no warning)
    assert asked == [1]
    assert torch.equal(param.detach(), torch.ones(3)) and optimizer.state[param] == {}
    gate.reset(lambda: True)
    optimizer.step()
    assert optimizer.state[param]["step"] == 1  # the first applied update is AdamW's first step
    assert not torch.equal(param.detach(), torch.ones(3))
