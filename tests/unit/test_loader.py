"""TokenLoader: packing, determinism, data-parallel sharding, epochs, exact resume, doc ids."""

import json

import numpy as np
import pytest
import torch

from distrib.config import DataConfig, TrainingConfig
from distrib.data.loader import TokenLoader, build_loaders, document_ids
from distrib.data.shards import TokenShards, write_token_dataset
from distrib.errors import ConfigError, DataError

VOCAB = 65536
EOS = VOCAB - 1  # never equal to a position in the arange streams below
SEQ = 8


@pytest.fixture
def shards(tmp_path) -> TokenShards:
    # token value = position, so every row tells where it came from; small shards to cross bounds
    stream = np.arange(801)
    write_token_dataset(tmp_path / "ds", {"train": stream, "val": stream[:100]}, VOCAB, EOS, 64)
    return TokenShards.open(tmp_path / "ds", "train")


def _loader(shards, dp_rank=0, dp_size=1, seed=0, global_batch=8, micro=2, **kw) -> TokenLoader:
    return TokenLoader(shards, SEQ, global_batch, micro, dp_rank, dp_size, seed, **kw)


def _starts(batches) -> list[int]:
    """Sample ids of a step's rows (row inputs start at sample * SEQ in the arange stream)."""
    return [int(row[0]) // SEQ for b in batches for row in b.inputs]


def test_shapes_and_labels_shifted(shards):
    loader = _loader(shards)
    assert loader.num_samples == 100 and loader.steps_per_epoch == 12
    assert loader.grad_accum_steps == 4
    batches = loader.next_step()
    assert len(batches) == 4
    for b in batches:
        assert b.inputs.shape == b.labels.shape == (2, SEQ)
        assert b.inputs.dtype == b.labels.dtype == torch.int64 and b.doc_ids is None
        assert torch.equal(b.labels[:, :-1], b.inputs[:, 1:])
        assert torch.equal(b.labels, b.inputs + 1)  # the stream is an arange
        assert torch.equal(b.inputs[:, 0] % SEQ, torch.zeros(2, dtype=torch.int64))


def test_deterministic_and_seed_dependent(shards):
    a, b, c = _loader(shards, seed=1), _loader(shards, seed=1), _loader(shards, seed=2)
    steps_a = [_starts(a.next_step()) for _ in range(5)]
    assert steps_a == [_starts(b.next_step()) for _ in range(5)]
    assert steps_a != [_starts(c.next_step()) for _ in range(5)]
    rows = np.random.default_rng([1, 0]).permutation(100)[:8].tolist()
    assert steps_a[0] == rows


def test_no_shuffle_is_sequential(shards):
    loader = _loader(shards, shuffle=False)
    assert _starts(loader.next_step()) == list(range(8))
    assert _starts(loader.next_step()) == list(range(8, 16))


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_ranks_disjoint_and_cover_global_batch(shards, dp_size):
    reference = _loader(shards, seed=3)
    ranks = [
        _loader(shards, r, dp_size, seed=3, micro=8 // (2 * dp_size) or 1) for r in range(dp_size)
    ]
    for _ in range(6):
        expected = _starts(reference.next_step())
        parts = [_starts(rank.next_step()) for rank in ranks]
        assert sum(parts, []) == expected  # contiguous slices, in rank order
        assert len(set(sum(parts, []))) == 8


def test_epoch_rollover(shards):
    loader = _loader(shards, seed=5)
    seen = [s for _ in range(loader.steps_per_epoch) for s in _starts(loader.next_step())]
    assert len(set(seen)) == 96  # 12 full batches of 8 distinct samples; the last 4 dropped
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_index"] == 0
    epoch1 = _starts(loader.next_step())
    assert epoch1 == np.random.default_rng([5, 1]).permutation(100)[:8].tolist()


def test_exact_resume_across_epochs(shards):
    full = _loader(shards, seed=7)
    for _ in range(10):
        full.next_step()
    state = full.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain ints
    resumed = _loader(shards, seed=7)
    resumed.load_state_dict(state)
    for _ in range(6):  # crosses into epoch 1
        a, b = full.next_step(), resumed.next_step()
        assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))


def test_state_independent_of_dp_size(shards):
    ranks = [_loader(shards, r, 2, seed=9) for r in range(2)]
    for _ in range(3):
        for rank in ranks:
            rank.next_step()
    states = [rank.state_dict() for rank in ranks]
    assert states[0] == states[1]
    single = _loader(shards, 0, 1, seed=9)
    single.load_state_dict(states[0])
    expected = sum((_starts(rank.next_step()) for rank in ranks), [])
    assert _starts(single.next_step()) == expected


def test_mismatched_state(shards):
    state = _loader(shards).state_dict()
    for key, value in [("seq_len", 16), ("global_batch_size", 16), ("num_samples", 5)]:
        with pytest.raises(DataError, match=key):
            _loader(shards).load_state_dict({**state, key: value})
    with pytest.raises(DataError, match="seed"):
        _loader(shards, seed=1).load_state_dict(state)


def test_reset(shards):
    loader = _loader(shards, shuffle=False)
    first = _starts(loader.next_step())
    loader.next_step()
    loader.reset()
    assert _starts(loader.next_step()) == first


def test_document_ids_function():
    e = 9
    inputs = torch.tensor([[1, 2, e, 3, e, e, 4, 5], [e, 1, 1, 1, 1, 1, 1, e]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(document_ids(inputs, e), expected)


def test_doc_ids_on_hand_made_stream(tmp_path):
    e = 1000
    stream = np.array([5, 6, e, 7, e, 8, 9, 10, e, 11, 12, 13, 14, e, 15, 16, 17])  # 17 tokens
    write_token_dataset(tmp_path / "ds", {"train": stream, "val": stream}, 1001, e, 5)
    shards = TokenShards.open(tmp_path / "ds", "train")
    loader = TokenLoader(shards, 4, 4, 2, 0, 1, 0, shuffle=False, document_ids=True)
    rows = [b for b in loader.next_step()]
    inputs = torch.cat([b.inputs for b in rows])
    doc_ids = torch.cat([b.doc_ids for b in rows])
    assert inputs.tolist() == [[5, 6, e, 7], [e, 8, 9, 10], [e, 11, 12, 13], [14, e, 15, 16]]
    assert doc_ids.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]


def test_too_small_and_bad_batch(shards):
    with pytest.raises(DataError) as err:
        TokenLoader(shards, 100, 16, 2, 0, 1, 0)
    message = str(err.value)
    assert "'train'" in message and "801 tokens" in message and "1,601" in message
    assert "data.seq_len" in message and "training.global_batch_size" in message
    with pytest.raises(ConfigError, match="not a multiple"):
        _loader(shards, dp_size=4, global_batch=8, micro=4)


def test_build_loaders(shards, tmp_path):
    data = DataConfig(dir=str(tmp_path / "ds"), seq_len=SEQ, cross_document_attention=False)
    training = TrainingConfig(global_batch_size=16, micro_batch_size=2, seed=4)
    train, val = build_loaders(data, training, dp_rank=1, dp_size=2)
    assert train.global_batch_size == 16 and train.shuffle and train.grad_accum_steps == 4
    # val has 100 tokens = 12 samples < 16: the largest multiple of micro x dp = 4 that fits
    assert val.global_batch_size == 12 and not val.shuffle and val.grad_accum_steps == 3
    assert train.next_step()[0].doc_ids is not None
    with pytest.raises(DataError, match="split 'val' has 100 tokens"):
        build_loaders(data, TrainingConfig(global_batch_size=64, micro_batch_size=16), 0, 1)


def test_pin_memory_gives_the_same_batches_contiguous_and_pinned(shards, monkeypatch):
    """With pin_memory every tensor that goes to the GPU is copied, once and contiguous, into
    page-locked memory (faked here: this machine may have no pinned-memory allocator)."""
    import distrib.data.loader as loader_mod

    copied: list[torch.Tensor] = []

    def fake_pinned(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype).copy_(t)
        copied.append(out)
        return out

    monkeypatch.setattr(loader_mod, "pinned", fake_pinned)
    plain = _loader(shards, document_ids=True).next_step()
    pinned = _loader(shards, document_ids=True, pin_memory=True).next_step()
    assert not _loader(shards).pin_memory and len(copied) == 3 * len(pinned)
    for p, b in zip(pinned, plain, strict=True):
        for got, want in ((p.inputs, b.inputs), (p.labels, b.labels), (p.doc_ids, b.doc_ids)):
            assert any(got is c for c in copied) and got.is_contiguous()
            assert torch.equal(got, want)
        assert torch.equal(p.sample_ids, b.sample_ids)


def test_build_loaders_passes_pin_memory(shards, tmp_path):
    data = DataConfig(dir=str(tmp_path / "ds"), seq_len=SEQ)
    training = TrainingConfig(global_batch_size=16, micro_batch_size=2)
    assert all(not x.pin_memory for x in build_loaders(data, training, 0, 1))
    assert all(x.pin_memory for x in build_loaders(data, training, 0, 1, pin_memory=True))
