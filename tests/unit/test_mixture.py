"""Weighted mixtures without training: the config entries and their errors, and the loader's
order (proportions, layout independence, exactly-once per source epoch, resume under another
data-parallel degree, weight schedules, epoch caps) on synthetic token streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distrib.config import load_config
from distrib.config.mixture import parse_schedule, parse_sources
from distrib.data.mixture import MixtureShards
from distrib.data.mixture_loader import MixtureLoader
from distrib.errors import ConfigError, DataError

SEQ = 8


class FakeShards:
    """A source's token stream: token t of the stream is t (mod 2^31), so a row names its start."""

    def __init__(self, num_samples: int) -> None:
        self.num_tokens = num_samples * SEQ + 1
        self.eos_id = 0
        self.vocab_size = 2**31

    def window(self, start: int, length: int) -> np.ndarray:
        return np.arange(start, start + length, dtype=np.int64)


def _loader(
    weights: dict[str, float],
    sizes: dict[str, int],
    dp: int = 1,
    rank: int = 0,
    schedule: list | None = None,
    max_epochs: dict[str, float] | None = None,
    seed: int = 7,
    batch: int = 16,
) -> MixtureLoader:
    raw = [
        {
            "name": n,
            "weight": w,
            **({"max_epochs": max_epochs[n]} if max_epochs and n in max_epochs else {}),
        }
        for n, w in weights.items()
    ]
    sources = parse_sources(raw)
    shards = MixtureShards("train", {n: FakeShards(sizes[n]) for n in weights})
    plan = parse_schedule(schedule or [], list(weights))
    return MixtureLoader(shards, sources, plan, SEQ, batch, 2, rank, dp, seed)


def _global(loader: MixtureLoader) -> list[tuple[int, int]]:
    sources, samples = loader.global_batch()
    return list(zip(sources.tolist(), samples.tolist(), strict=True))


def _rank_ids(loaders: list[MixtureLoader]) -> list[int]:
    """The sample ids of one step, ranks in order."""
    return [int(i) for loader in loaders for b in loader.next_step() for i in b.sample_ids]


W = {"web": 0.6, "code": 0.3, "books": 0.1}
SIZES = {"web": 400, "code": 300, "books": 50}


def test_realised_proportions_follow_the_weights_within_one_sample() -> None:
    loader = _loader(W, SIZES)
    counts = np.zeros(3)
    for step in range(1, 301):
        for j, _ in _global(loader):
            counts[j] += 1
        n = step * 16
        assert np.all(np.abs(counts - n * np.array(list(W.values()))) <= 1.0), step
    shares = loader.metrics()
    assert shares["data_share/books"] == pytest.approx(0.1, abs=1 / 4800)


def test_global_batch_i_is_the_same_under_dp_1_2_and_4() -> None:
    single = _loader(W, SIZES)
    layouts = {dp: [_loader(W, SIZES, dp, r) for r in range(dp)] for dp in (2, 4)}
    for _ in range(40):
        want = _rank_ids([single])
        for ranks in layouts.values():
            assert _rank_ids(ranks) == want


def test_each_source_draws_every_sample_once_per_epoch() -> None:
    loader = _loader(W, SIZES)
    drawn: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for _ in range(200):  # books: 0.1 x 16 x 200 = 320 draws = 6.4 epochs of 50
        for j, i in _global(loader):
            drawn[j].append(i)
    for j, size in enumerate(SIZES.values()):
        ids = drawn[j]
        for e in range(len(ids) // size):
            assert sorted(ids[e * size : (e + 1) * size]) == list(range(size)), (j, e)


def test_a_resume_under_another_dp_degree_continues_exactly() -> None:
    reference = _loader(W, SIZES)
    want = [_rank_ids([reference]) for _ in range(12)]
    first = [_loader(W, SIZES, 2, r) for r in range(2)]
    got = [_rank_ids(first) for _ in range(7)]
    state = first[0].state_dict()
    assert state == first[1].state_dict()  # the same on every rank
    second = [_loader(W, SIZES, 4, r) for r in range(4)]
    for loader in second:
        loader.load_state_dict(state)
    got += [_rank_ids(second) for _ in range(5)]
    assert got == want


def test_a_weight_schedule_changes_the_mix_at_its_step_and_survives_resume() -> None:
    schedule = [{"step": 11, "weights": {"web": 0.0, "code": 0.5, "books": 0.5}}]
    loader = _loader(W, SIZES, schedule=schedule)
    before = [j for _ in range(10) for j, _ in _global(loader)]
    assert before.count(0) == 96  # 0.6 x 160
    state = loader.state_dict()
    after = [j for _ in range(10) for j, _ in _global(loader)]
    assert after.count(0) == 0 and after.count(1) == after.count(2) == 80
    resumed = _loader(W, SIZES, schedule=schedule)
    resumed.load_state_dict(state)
    assert [j for _ in range(10) for j, _ in _global(resumed)] == after


def test_a_capped_source_stops_and_the_others_take_its_share() -> None:
    loader = _loader(W, SIZES, max_epochs={"books": 1.0})
    books = [i for _ in range(60) for j, i in _global(loader) if j == 2]
    assert sorted(books) == list(range(50))  # one epoch, then no more
    loader = _loader({"a": 1.0}, {"a": 20}, max_epochs={"a": 1.0})
    _global(loader)
    with pytest.raises(DataError, match="reached its max_epochs"):
        _global(loader)


def test_a_changed_data_order_is_refused_on_resume() -> None:
    state = _loader(W, SIZES).state_dict()
    with pytest.raises(DataError, match="training.seed changed"):
        _loader(W, SIZES, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="not a mixture's"):
        _loader(W, SIZES).load_state_dict({"epoch": 0, "batch_index": 0})


def _config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    load_config(path)


SOURCES = '[[data.sources]]\nname = "a"\nweight = 1\n[[data.sources]]\nname = "b"\nweight = 1\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[data.sources]]\nname = "a"\nwieght = 1\n', "data.sources[0]: unknown key 'wieght'"),
        ('[[data.sources]]\nname = "a"\n', "data.sources[0]: needs a name and a weight"),
        ('[[data.sources]]\nname = "a b"\nweight = 1\n', "data.sources[0].name = 'a b'"),
        (
            '[[data.sources]]\nname = "a"\nweight = -1\n',
            "data.sources[0].weight = -1.0: must be >= 0",
        ),
        (SOURCES.replace('"b"', '"a"'), "the name 'a' is used twice"),
        (SOURCES.replace("weight = 1", "weight = 0"), "the weights sum to 0"),
        (
            SOURCES + "[[data.weight_schedule]]\nstep = 5\nweights = { c = 1 }\n",
            "data.weight_schedule[0].weights: no source named 'c'",
        ),
        (
            SOURCES + "[[data.weight_schedule]]\nstep = 5\nweights = { a = 1 }\n"
            "[[data.weight_schedule]]\nstep = 5\nweights = { b = 1 }\n",
            "data.weight_schedule[1].step = 5: steps must be >= 1 and increasing",
        ),
        ("[[data.weight_schedule]]\nstep = 5\nweights = { a = 1 }\n", "needs a mixture"),
        ('[data]\nsource = "x.txt"\n' + SOURCES, "data.source = 'x.txt' and data.sources"),
        ('[data]\nformat = "chat"\n' + SOURCES, "data.format = chat is not supported"),
    ],
)
def test_a_bad_mixture_names_the_entry_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, text)
    assert message in str(err.value)


def test_a_mixture_has_no_command_line_form() -> None:
    with pytest.raises(ConfigError, match="data.sources has no command-line form"):
        load_config(None, ["--data.sources=a"])


def test_a_source_field_is_set_by_name_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(SOURCES)
    cfg = load_config(path, ["--data.sources.b.weight=3", "--data.sources.a.max_epochs=2"])
    assert [(s["name"], s["weight"], s.get("max_epochs")) for s in cfg.data.sources] == [
        ("a", 1, 2.0),
        ("b", 3.0, None),
    ]
    with pytest.raises(ConfigError, match="no source named 'c'.*valid: a, b"):
        load_config(path, ["--data.sources.c.weight=1"])
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        load_config(path, ["--data.sources.a.wieght=1"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight = -1.0: must be >= 0"):
        load_config(path, ["--data.sources.a.weight=-1"])
