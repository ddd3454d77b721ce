"""Cutting the model into pipeline stages and placing the stages on ranks (no processes)."""

from __future__ import annotations

import pytest
import torch

from distrib.config.rules import check_tied_embeddings, stage_layers
from distrib.errors import ConfigError
from distrib.models.transformer import Transformer
from distrib.parallel.pipeline import build_stage, stages_of_rank
from tests.support.tiny import tiny_config

CFG = tiny_config()  # 4 layers, untied: stages of layers [0, 1], [2] and [3] below


def test_stage_layers_even() -> None:
    assert stage_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(4, 1) == [[0, 1, 2, 3]]
    assert stage_layers(4, 4) == [[0], [1], [2], [3]]


def test_stage_layers_uneven_gives_earlier_stages_the_extra_layer() -> None:
    assert stage_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]


def test_stage_layers_explicit_split_points() -> None:
    assert stage_layers(8, 3, [2, 7]) == [[0, 1], [2, 3, 4, 5, 6], [7]]
    assert stage_layers(8, 4, [1, 3, 6]) == [[0], [1, 2], [3, 4, 5], [6, 7]]


@pytest.mark.parametrize(
    ("n_layers", "num_stages", "points"),
    [(4, 5, None), (4, 0, None), (8, 3, [2]), (8, 3, [4, 4]), (8, 3, [0, 4]), (8, 3, [4, 8])],
)
def test_stage_layers_rejects_impossible_cuts(
    n_layers: int, num_stages: int, points: list[int] | None
) -> None:
    with pytest.raises(ConfigError):
        stage_layers(n_layers, num_stages, points)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_stages_of_rank_single(schedule: str) -> None:
    assert [stages_of_rank(r, 4, 1, schedule) for r in range(4)] == [[0], [1], [2], [3]]
    with pytest.raises(ConfigError):
        stages_of_rank(0, 4, 2, schedule)


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "zero_bubble"])
def test_stages_of_rank_looped(schedule: str) -> None:
    assert [stages_of_rank(r, 2, 2, schedule) for r in range(2)] == [[0, 2], [1, 3]]
    assert stages_of_rank(1, 4, 3, schedule) == [1, 5, 9]
    # Every stage is held by exactly one rank.
    held = sorted(s for r in range(4) for s in stages_of_rank(r, 4, 3, schedule))
    assert held == list(range(12))
    with pytest.raises(ConfigError):
        stages_of_rank(0, 2, 1, schedule)


def test_stages_of_rank_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        stages_of_rank(0, 2, 1, "dualpipe")


def test_build_stage_keeps_its_modules_under_full_model_names() -> None:
    first = build_stage(CFG, [0, 1], first=True, last=False)
    assert list(first.layers.keys()) == ["0", "1"]
    assert first.tok_embeddings is not None and first.norm is None and first.output is None
    middle = build_stage(CFG, [2], first=False, last=False)
    assert list(middle.layers.keys()) == ["2"]
    assert middle.tok_embeddings is None and middle.norm is None and middle.output is None
    last = build_stage(CFG, [3], first=False, last=True)
    assert last.tok_embeddings is None and last.norm is not None and last.output is not None
    first_names = {n for n, _ in first.named_parameters()}
    assert {"tok_embeddings.weight", "layers.1.feed_forward.w2.weight"} <= first_names
    middle_names = {n for n, _ in middle.named_parameters()}
    assert all(n.startswith("layers.2.") for n in middle_names)
    last_names = {n for n, _ in last.named_parameters()}
    assert last_names == {n.replace("layers.2.", "layers.3.") for n in middle_names} | {
        "norm.weight",
        "output.weight",
    }
    assert all(p.is_meta for stage in (first, middle, last) for p in stage.parameters())


def test_build_stage_parameters_partition_the_whole_model() -> None:
    with torch.device("meta"):
        whole = {n for n, _ in Transformer(CFG).named_parameters()}
    cuts = stage_layers(CFG.n_layers, 3)
    stages = [build_stage(CFG, ids, s == 0, s == len(cuts) - 1) for s, ids in enumerate(cuts)]
    per_stage = [{n for n, _ in stage.named_parameters()} for stage in stages]
    assert set().union(*per_stage) == whole
    assert sum(len(names) for names in per_stage) == len(whole)
    assert all(p.is_meta for stage in stages for p in stage.parameters())


def test_tied_embeddings_cannot_be_split_across_stages() -> None:
    tied = tiny_config(tie_embeddings=True)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        check_tied_embeddings(tied, tp=1, pp=2)  # what build_pipeline checks first
    whole = build_stage(tied, list(range(tied.n_layers)), first=True, last=True)
    assert whole.output.weight is whole.tok_embeddings.weight
