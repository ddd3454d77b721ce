"""DPO: the loss and rewards against the formula and against TRL's DPOTrainer, the objective's
metrics, sequence log-probabilities, and the reference table."""

from __future__ import annotations

import collections
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distrib.data.loader import Batch
from distrib.engines.objectives import DPOObjective, dpo_loss
from distrib.models.loss import IGNORE_INDEX, sequence_logps
from distrib.train import reference

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _logps(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


def test_dpo_loss_is_the_paper_s_formula() -> None:
    pc, pr, rc, rr = _logps(0, 6)
    beta = 0.3
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    want = torch.tensor(
        [
            -math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
        ],
        dtype=torch.float64,
    ).mean()
    torch.testing.assert_close(loss, want.to(loss.dtype), **TOL)
    torch.testing.assert_close(chosen, beta * (pc - rc), **TOL)
    torch.testing.assert_close(rejected, beta * (pr - rr), **TOL)
    # Conservative DPO: a share e of flipped labels mixes in the loss of the other order.
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    m = beta * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(
        smoothed, (-0.9 * F.logsigmoid(m) - 0.1 * F.logsigmoid(-m)).mean(), **TOL
    )


def test_dpo_loss_equals_trl_on_the_same_log_probabilities() -> None:
    """TRL's DPOTrainer._compute_loss (sigmoid loss, precomputed reference) run on a stand-in
    model whose per-token log-probabilities sum to ours: same loss, rewards, margin, accuracy."""
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs, length, beta = 5, 4, 0.2
    pc, pr, rc, rr = (t.float() for t in _logps(1, pairs))
    # Per-token log-probabilities whose sums are pc (chosen rows) and pr (rejected rows).
    per_token = torch.cat([pc, pr])[:, None].expand(-1, length) / length
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * pairs, length),
        mean_logits=torch.zeros(2 * pairs, length),
        is_top1=torch.zeros(2 * pairs, length, dtype=torch.bool),
    )
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
    )
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, length + 1, dtype=torch.long),
        "completion_mask": torch.ones(2 * pairs, length + 1, dtype=torch.long),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    try:
        trl_loss = DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, False)
    except (AttributeError, TypeError, KeyError) as err:  # another TRL version's internals
        pytest.skip(f"trl {trl.__version__}: DPOTrainer._compute_loss differs ({err})")
    metrics = stub._metrics["train"]
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert metrics["rewards/chosen"][-1] == pytest.approx(float(chosen.mean()), rel=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(float(rejected.mean()), rel=1e-5)
    assert metrics["rewards/margins"][-1] == pytest.approx(
        float((chosen - rejected).mean()), rel=1e-5, abs=1e-6
    )
    assert metrics["rewards/accuracies"][-1] == pytest.approx(
        float((chosen > rejected).float().mean())
    )


def test_sequence_logps_sum_the_counted_labels_only() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 4, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [7]])
    logp = torch.log_softmax(logits, -1)
    want = torch.stack(
        [
            logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 3, 4],
            logp[1, 4, 7],
        ]
    )
    torch.testing.assert_close(sequence_logps(logits, labels), want)


class _Table(torch.nn.Module):
    """A 'model' whose logits make each row's log-probability of label t equal -t."""

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        vocab = 8
        logits = torch.zeros(*tokens_BL.shape, vocab)
        return logits - torch.arange(vocab).float() + torch.logsumexp(logits, -1, keepdim=True)


def _pref_batch(pairs: int, ref: torch.Tensor | None = None) -> Batch:
    labels = torch.full((2 * pairs, 3), IGNORE_INDEX)
    labels[:pairs, 1] = 1  # chosen responses: one token of id 1
    labels[pairs:, 1:] = 2  # rejected: two tokens of id 2
    return Batch(
        torch.zeros_like(labels), labels, sample_ids=torch.arange(pairs), reference_logps=ref
    )


def test_objective_logs_rewards_margin_and_accuracy() -> None:
    objective = DPOObjective(types.SimpleNamespace(beta=0.5, label_smoothing=0.0))
    model = _Table()
    batch = _pref_batch(3, ref=torch.zeros(6))
    logps = DPOObjective.sequence_logps(model, batch, torch.device("cpu"))
    # log softmax of (-t + const) differs from -t by one per-row constant: compare differences.
    chosen, rejected = logps.chunk(2)
    loss = objective.loss(model, batch, torch.device("cpu"))
    want, c, r = dpo_loss(chosen, rejected, torch.zeros(3), torch.zeros(3), 0.5)
    torch.testing.assert_close(loss, want)
    sums = objective.take_metrics()
    assert float(sums["reward_accuracy"][0]) == 3 and float(sums["reward_accuracy"][1]) == 3
    torch.testing.assert_close(sums["reward_margin"][0], (c - r).sum())
    assert objective.take_metrics() == {}  # taken: reset


class _FakeEngine:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.seen: list[int] = []

    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        ids = batch.sample_ids.tolist()
        self.seen += ids
        return torch.tensor([float(i) for i in ids] + [-float(i) for i in ids])


class _FakeLoader:
    micro_batch_size = 2

    def __init__(self, n: int) -> None:
        self.num_samples = n

    def batch_of(self, ids: np.ndarray) -> Batch:
        rows = torch.zeros(2 * len(ids), 1)
        return Batch(rows, rows, sample_ids=torch.as_tensor(ids))


def test_reference_table_covers_every_pair_and_is_read_back(tmp_path: Path) -> None:
    engine, loader = _FakeEngine(), _FakeLoader(5)
    table = reference.compute_table(engine, loader, dp_rank=0, dp_size=1)
    assert table.tolist() == [[i, -i] for i in range(5)]
    assert sorted(set(engine.seen)) == list(range(5))  # the last, partial batch wraps around
    notes: list[str] = []
    path = tmp_path / reference.REFERENCE_FILE
    recipe = {"dataset": "abc", "init_from": "run:x"}
    args = (engine, 0, 1, True, notes.append)
    first = reference.load_or_compute(path, recipe, {"train": loader}, *args)
    engine.seen.clear()
    again = reference.load_or_compute(path, recipe, {"train": loader}, *args)
    assert engine.seen == [] and "read from" in notes[-1]
    np.testing.assert_array_equal(first["train"], again["train"])
    reference.load_or_compute(path, {**recipe, "dataset": "changed"}, {"train": loader}, *args)
    assert engine.seen, "a changed dataset computes the reference again"
    wrapped = reference.WithReference(loader, first["train"])
    batch = wrapped.attach(_pref_batch(2))
    assert batch.reference_logps.tolist() == [0.0, 1.0, -0.0, -1.0]
