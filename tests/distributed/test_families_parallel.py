"""The family options under parallel layouts (gloo, 2 processes) against one process.

Tensor parallelism: q/k/v biases shard with their projections; the q/k norms act on whole heads,
which tp splits between ranks, so their weights are replicated and their gradients summed over
the tp ranks (`tp_plan`). A sliding window and a head dim other than dim / n_heads are per-head
and need nothing. Loss, every gradient and the loss after an optimizer step must match one
process.

Expert parallelism: a Hugging Face Qwen3-MoE folder loaded into experts sharded over ep = 2
(each rank keeps its half of every stacked expert tensor) gives transformers' logits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from distrib.models.hf import read_hf_config
from distrib.models.transformer import Transformer
from distrib.parallel.expert import apply_ep
from distrib.parallel.init import load_hf_weights, materialize
from tests.distributed.harness import spawn
from tests.distributed.test_tensor_parallel import (
    CFG,
    _assert_grads_match,
    _batch,
    _build,
    _loss,
    _step_loss,
)

pytestmark = pytest.mark.slow

TP = 2
FAMILY_CFG = dataclasses.replace(
    CFG, family="custom", qkv_bias=True, qk_norm=True, head_dim=16, sliding_window=5
)


def _worker(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    for backend, with_docs in (("eager", False), ("sdpa", True)):
        where = f"{backend} docs={with_docs}"
        cfg = dataclasses.replace(FAMILY_CFG, attention=backend)
        ref, model = _build(cfg, None), _build(cfg, mesh, loss_parallel=False)
        with torch.no_grad():  # norms at one and biases at zero would hide a mix-up
            for m in (ref, model):
                for name, p in m.named_parameters():
                    gen = torch.Generator().manual_seed(len(name))
                    if name.endswith(("q_norm.weight", "k_norm.weight", ".bias")):
                        full = torch.rand(p.shape, generator=gen) + 0.5
                        p.copy_(_like(full, p))
        x, y, doc_ids = _batch(with_docs)
        loss = _loss(model(x, doc_ids), y)
        loss.backward()
        ref_loss = _step_loss(ref, x, y, doc_ids, False)
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=0, msg=where)
        _assert_grads_match(model, ref, where)
        for m in (model, ref):
            torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True).step()
            m.zero_grad(set_to_none=True)
        loss2 = _step_loss(model, x, y, doc_ids, False)
        ref_loss2 = _step_loss(ref, x, y, doc_ids, False)
        torch.testing.assert_close(loss2, ref_loss2, rtol=1e-5, atol=0, msg=f"after: {where}")


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full


def test_family_attention_under_tp_matches_single_process() -> None:
    spawn(_worker, TP)


def _ep_worker(rank: int, world_size: int, folder: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    cfg = dataclasses.replace(read_hf_config(Path(folder)), attention="eager")
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_ep(model, mesh)
    materialize(model, torch.device("cpu"), seed=3)
    load_hf_weights([model], folder, cfg)
    w1 = model.layers["1"].feed_forward.experts.w1
    assert isinstance(w1, DTensor) and w1.to_local().shape[0] == cfg.moe_experts // world_size
    expected = torch.load(Path(folder) / "logits.pt", weights_only=True)
    with torch.no_grad():
        got = model(torch.load(Path(folder) / "tokens.pt", weights_only=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_hf_moe_loads_under_expert_parallelism(tmp_path: Path) -> None:
    from tests.unit.test_hf_families import logits, random_hf, tokens

    hf = random_hf("qwen3_moe", tmp_path)
    torch.save(tokens(), tmp_path / "tokens.pt")
    torch.save(logits(hf), tmp_path / "logits.pt")
    spawn(_ep_worker, 2, str(tmp_path))
