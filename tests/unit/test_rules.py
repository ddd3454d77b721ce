"""Validation and the builders apply the same rules (`distrib.config.rules`), so they agree on
every layout: what the config check refuses before any process starts, the builder that would
meet it refuses with the same message, and what the check accepts, the builder builds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from distrib.cli import _check_layout
from distrib.config import Config, load_config
from distrib.data.loader import TokenLoader
from distrib.data.shards import TokenShards, write_token_dataset
from distrib.errors import ConfigError
from distrib.models.build import build_on_meta
from distrib.parallel.activation import apply_ac
from distrib.parallel.dims import ParallelDims
from distrib.parallel.pipeline import build_pipeline

MODEL = ["--model.n_layers=4", "--model.tie_embeddings=false", "--data.seq_len=16"]

# (overrides, world size, None if valid else a fragment of the error)
LAYOUTS: list[tuple[list[str], int, str | None]] = [
    ([], 1, None),
    (["--parallel.dp_shard=2"], 2, None),
    (["--parallel.dp_shard=2", "--training.micro_batch_size=16"], 2, "not a multiple"),
    (["--parallel.dp_shard=-1", "--training.global_batch_size=12"], 4, "not a multiple"),
    (["--parallel.pp=2"], 2, None),
    (["--parallel.pp=2", "--parallel.pp_split_points=1"], 2, None),
    (["--parallel.pp=2", "--parallel.pp_split_points=3,1"], 2, "has 2 point"),
    (["--parallel.pp=2", "--parallel.pp_split_points=4"], 2, "increase strictly"),
    (["--parallel.pp=2", "--parallel.pp_microbatches=3"], 2, "must divide"),
    (["--parallel.pp=4", "--parallel.pp_microbatches=2"], 4, "1f1b needs at least"),
    (
        ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b"],
        2,
        "pp_stages_per_rank >= 2",
    ),
    (
        [
            "--parallel.pp=2",
            "--parallel.pp_schedule=interleaved_1f1b",
            "--parallel.pp_stages_per_rank=2",
        ],
        2,
        None,
    ),
    (["--parallel.pp=2", "--model.tie_embeddings=true"], 2, "tie_embeddings"),
    (["--parallel.activation_checkpoint=selective"], 1, None),
    (
        ["--parallel.activation_checkpoint=full", "--parallel.activation_memory_budget=2"],
        1,
        "[0, 1]",
    ),
]


def _validate(overrides: list[str], world: int) -> Config:
    """What `distrib train` checks before any process group starts."""
    cfg = load_config(None, [*MODEL, *overrides])
    _check_layout(cfg, world)
    return cfg


class _Built(Exception):
    """Raised by the fake mesh once the pipeline's rules have all passed."""


@dataclasses.dataclass
class _FakePPMesh:
    pp: int

    def size(self) -> int:
        return self.pp

    def get_local_rank(self) -> int:
        return 0

    def get_group(self) -> None:
        raise _Built


def _build(cfg: Config, world: int, shards: TokenShards) -> None:
    """Each builder that applies a layout rule, as `build_engine` and `build_loaders` call it."""
    dims = ParallelDims.from_config(cfg.parallel, world)
    for dp_rank in range(dims.dp):
        t = cfg.training
        TokenLoader(shards, 16, t.global_batch_size, t.micro_batch_size, dp_rank, dims.dp, 0)
    if dims.pp > 1:
        with pytest.raises(_Built):
            build_pipeline(
                cfg.model, cfg.parallel, _FakePPMesh(dims.pp), None, 0, t.micro_batch_size
            )  # type: ignore[arg-type]
    p = cfg.parallel
    apply_ac(build_on_meta(cfg.model), p.activation_checkpoint, p.activation_memory_budget)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    folder: Path = tmp_path_factory.mktemp("rules") / "ds"
    stream = np.arange(20_000) % 200
    write_token_dataset(folder, {"train": stream, "val": stream[:2000]}, 256, 0)
    return TokenShards.open(folder, "train")


def _unchecked(overrides: list[str]) -> Config:
    """The config as written, without validation: what a builder would be handed if the check
    were skipped."""
    cfg = Config()
    for arg in [*MODEL, *overrides]:
        key, value = arg[2:].split("=", 1)
        section, name = key.split(".")
        field = getattr(cfg, section)
        kind = type(getattr(field, name))
        setattr(field, name, value.lower() == "true" if kind is bool else kind(value))
    return cfg


@pytest.mark.parametrize(("overrides", "world", "error"), LAYOUTS)
def test_validation_and_builders_agree(
    overrides: list[str], world: int, error: str | None, shards: TokenShards
) -> None:
    if error is None:
        _build(_validate(overrides, world), world, shards)
        return
    with pytest.raises(ConfigError) as refused:
        _validate(overrides, world)
    assert error in str(refused.value)
    with pytest.raises(ConfigError) as built:
        _build(_unchecked(overrides), world, shards)
    assert str(built.value) == str(refused.value)
