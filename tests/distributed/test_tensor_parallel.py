"""Tensor + sequence parallelism (tp=2, gloo) against the single-process model.

Each check builds the same model on meta twice, once plain and once through `apply_tp`, fills
both with `materialize` (layout-invariant values), and compares loss, every gradient and the
loss after an optimizer step. Assertions run inside the spawned ranks; a failure fails spawn.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from distrib.config import ModelConfig
from distrib.models.loss import causal_lm_loss
from distrib.models.transformer import Transformer
from distrib.parallel.activation import apply_ac
from distrib.parallel.compile import apply_compile
from distrib.parallel.init import clean_name, materialize
from distrib.parallel.tensor import apply_tp, loss_context, tp_plan
from tests.distributed.harness import spawn
from tests.support.tiny import tiny_config

pytestmark = pytest.mark.slow

TP = 2
SEED = 7
B, L = 2, 16
# Two layers are enough to check the tp plan and keep the spawned ranks quick.
CFG = tiny_config(n_layers=2, attention="eager")


def _build(cfg: ModelConfig, mesh: DeviceMesh | None, loss_parallel: bool = True) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    if mesh is not None:
        apply_tp(model, mesh, loss_parallel)
    materialize(model, torch.device("cpu"), SEED)
    return model


def _batch(with_docs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (B, L + 1), generator=gen)
    doc_ids = None
    if with_docs:  # non-decreasing ids: a new document starts wherever a boundary is drawn
        doc_ids = (torch.rand(B, L, generator=gen) < 0.2).long().cumsum(dim=1)
    return tokens[:, :-1], tokens[:, 1:], doc_ids


def _loss(logits: Tensor, labels: Tensor) -> Tensor:
    # Under loss_parallel the loss is a replicated DTensor; its full_tensor() is a plain scalar
    # whose backward still runs through the vocab-parallel cross-entropy.
    loss = causal_lm_loss(logits, labels)
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_grads_match(model: nn.Module, ref: nn.Module, where: str) -> None:
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    names = []
    for name, param in model.named_parameters():
        name = clean_name(name)
        names.append(name)
        torch.testing.assert_close(
            _full(param.grad), ref_grads[name], atol=1e-6, rtol=1e-5, msg=f"{where}: {name}"
        )
    assert sorted(names) == sorted(ref_grads), where


def _step_loss(model: nn.Module, x: Tensor, y: Tensor, doc_ids: Tensor | None, lp: bool) -> Tensor:
    """Forward, loss, backward; the loss as a plain tensor."""
    with loss_context(lp):
        logits = model(x, doc_ids)
        loss = _loss(logits, y)
        loss.backward()
    return loss.detach()


def _parity_worker(rank: int, world_size: int, loss_parallel: bool) -> None:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    cases = [  # (attention backend, document masking, tied embeddings)
        ("eager", False, False),
        ("eager", True, False),
        ("sdpa", True, False),
        ("sdpa", False, True),
    ]
    for backend, with_docs, tied in cases:
        where = f"{backend} docs={with_docs} tied={tied} loss_parallel={loss_parallel}"
        cfg = dataclasses.replace(CFG, attention=backend, tie_embeddings=tied)
        ref, model = _build(cfg, None), _build(cfg, mesh, loss_parallel)
        x, y, doc_ids = _batch(with_docs)

        with loss_context(loss_parallel):
            logits = model(x, doc_ids)
            if loss_parallel:  # vocab-sharded, never gathered
                assert isinstance(logits, DTensor) and logits.placements == (Shard(2),), where
            else:
                assert not isinstance(logits, DTensor) and logits.shape == (B, L, cfg.vocab_size)
            loss = _loss(logits, y)
            loss.backward()
        ref_loss = _step_loss(ref, x, y, doc_ids, False)
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=0, msg=where)
        _assert_grads_match(model, ref, where)

        # What the engine does next: the global grad norm over sharded gradients, an update.
        norm = _full(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0, msg=where)
        for m in (model, ref):
            torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True).step()
            m.zero_grad(set_to_none=True)
        loss2 = _step_loss(model, x, y, doc_ids, loss_parallel)
        ref_loss2 = _step_loss(ref, x, y, doc_ids, False)
        assert loss2 < loss, where
        torch.testing.assert_close(loss2, ref_loss2, rtol=1e-5, atol=0, msg=f"after step: {where}")


@pytest.mark.parametrize("loss_parallel", [True, False], ids=["loss_parallel", "gathered"])
def test_tp_matches_single_process(loss_parallel: bool) -> None:
    spawn(_parity_worker, TP, loss_parallel)


def _cut(model: Transformer, first: bool, last: bool) -> Transformer:
    """Drop the modules a pipeline stage does not hold (before any parallelization)."""
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


def _stage_worker(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    x, y, doc_ids = _batch(with_docs=True)
    ref = _build(CFG, None)
    with torch.no_grad():
        h_BLD = ref.tok_embeddings(x)  # what the previous stage would have sent, in full
    shard = slice(rank * L // TP, (rank + 1) * L // TP)

    # A middle stage (no embedding, no head): receives and returns this rank's sequence shard.
    with torch.device("meta"):
        stage = _cut(Transformer(CFG), first=False, last=False)
    apply_tp(stage, mesh, loss_parallel=True)
    assert not any(
        key.startswith(("tok_embeddings", "norm", "output")) for key in tp_plan(stage, True)
    )
    materialize(stage, torch.device("cpu"), SEED)
    ref_stage = _cut(_build(CFG, None), first=False, last=False)
    h_in = h_BLD[:, shard].clone().requires_grad_()
    h_out = stage(h_in, doc_ids)
    assert not isinstance(h_out, DTensor) and h_out.shape == (B, L // TP, CFG.dim)
    ref_in = h_BLD.clone().requires_grad_()
    ref_out = ref_stage(ref_in, doc_ids)
    torch.testing.assert_close(h_out, ref_out[:, shard], atol=1e-6, rtol=1e-5)
    # The gradient a stage sends back is likewise its shard of the full input gradient.
    grad_out = torch.randn(B, L, CFG.dim, generator=torch.Generator().manual_seed(1))
    h_out.backward(grad_out[:, shard])
    ref_out.backward(grad_out)
    torch.testing.assert_close(h_in.grad, ref_in.grad[:, shard], atol=1e-6, rtol=1e-5)
    _assert_grads_match(stage, ref_stage, "middle stage")

    # A last stage (no embedding, with the head) fed sequence-sharded hidden states.
    with torch.device("meta"):
        last = _cut(Transformer(CFG), first=False, last=True)
    apply_tp(last, mesh, loss_parallel=True)
    materialize(last, torch.device("cpu"), SEED)
    ref_last = _cut(_build(CFG, None), first=False, last=True)
    loss = _step_loss(last, h_BLD[:, shard], y, doc_ids, True)
    ref_loss = _step_loss(ref_last, h_BLD, y, doc_ids, False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_match(last, ref_last, "last stage")


def test_tp_pipeline_stage_takes_sequence_shards() -> None:
    spawn(_stage_worker, TP)


def _ac_compile_worker(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    cfg = dataclasses.replace(CFG, attention="sdpa")
    ref = _build(cfg, None)
    x, y, doc_ids = _batch(with_docs=True)
    ref_loss = _step_loss(ref, x, y, doc_ids, False)
    # Compile without AC once too: the first block then takes the embedding's output directly,
    # an AsyncCollectiveTensor before apply_tp settled it (the backward broke on that).
    variants = [("selective", False), ("full", False), ("none", True), ("selective", True)]
    for ac, compile_blocks in variants:
        where = f"tp + {ac} ac, compile={compile_blocks}"
        with torch.device("meta"):
            model = Transformer(cfg)
        # The order of parallelization: TP, then AC, then compile, then materialize.
        apply_tp(model, mesh, loss_parallel=True)
        apply_ac(model, ac)
        if compile_blocks:  # aot_eager: inductor takes ~30 s cold for one block on this CPU
            apply_compile(model, backend="aot_eager")
        materialize(model, torch.device("cpu"), SEED)
        loss = _step_loss(model, x, y, doc_ids, True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=where)
        _assert_grads_match(model, ref, where)


def test_tp_with_ac_and_compile() -> None:
    spawn(_ac_compile_worker, TP)
