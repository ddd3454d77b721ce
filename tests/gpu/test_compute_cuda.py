"""The compute path on CUDA in bfloat16 autocast: a block with SDPA pinned compiles to one graph,
compiled blocks train like eager, the chunked loss matches the plain one with less memory, and
AdamW is the fused kernel. The same properties on a CPU are tested in tests/unit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from distrib.config import TrainingConfig
from distrib.engines.optim import build_optimizer
from distrib.models.loss import causal_lm_loss
from distrib.models.transformer import Transformer
from distrib.parallel.compile import apply_compile
from tests.support.tiny import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Head dim 64, GQA 4:2, a 32k vocabulary as in the 1b preset so the logits dominate memory.
CFG = tiny_config(
    dim=256,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=768,
    vocab_size=32000,
    max_seq_len=1024,
    attention="sdpa",
)
B, L = 4, 1024
# bf16 matmuls in both runs; what differs is fusion and summation order.
REL_TOL = 2e-2


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> Transformer:
    with torch.device("meta"):
        model = Transformer(CFG)
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
    return model


def _batch(doc_ids: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (B, L + 1), device="cuda", generator=gen)
    ids = None
    if doc_ids:
        ids = (torch.rand(B, L, device="cuda", generator=gen) < 0.01).long().cumsum(dim=1)
    return tokens[:, :-1], tokens[:, 1:], ids


def rel_err(got: Tensor, ref: Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def _loss_and_grads(model: nn.Module, chunk: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    x, y, _ = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if chunk:
            loss = model(x, labels_BL=y, loss_chunk_tokens=chunk)
        else:
            loss = causal_lm_loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["causal", "doc_ids"])
def test_block_with_pinned_sdpa_is_one_graph(with_doc_ids: bool) -> None:
    model = _model()
    block = model.layers["0"]
    x, _, doc_ids = _batch(with_doc_ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_BLD = model.tok_embeddings(x)
        explained = torch._dynamo.explain(block)(h_BLD, model.rope_cos, model.rope_sin, doc_ids)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_blocks_train_like_eager() -> None:
    ref_loss, ref_grads = _loss_and_grads(_model())
    model = _model()
    apply_compile(model)  # Inductor, as training.compile = true runs it
    loss, grads = _loss_and_grads(model)
    assert rel_err(loss, ref_loss) < 1e-2
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < REL_TOL, name


def _peak_bytes(chunk: int) -> tuple[int, Tensor, dict[str, Tensor]]:
    model = _model()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, grads = _loss_and_grads(model, chunk)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, loss, grads


def test_chunked_loss_matches_plain_and_never_holds_the_float32_logits() -> None:
    plain_peak, ref_loss, ref_grads = _peak_bytes(0)
    chunk_peak, loss, grads = _peak_bytes(512)
    assert rel_err(loss, ref_loss) < 1e-3
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < REL_TOL, name
    # The float32 logits of the whole batch: B * L * V * 4 bytes (512 MiB here). The plain loss
    # holds them (and more); the chunked one at most one chunk's worth at a time.
    logits_fp32 = B * L * CFG.vocab_size * 4
    assert chunk_peak < plain_peak - logits_fp32 // 2, (chunk_peak, plain_peak)


def test_adamw_is_fused_on_cuda() -> None:
    model = _model()
    optimizer = build_optimizer(model, TrainingConfig())
    assert optimizer.defaults["fused"] is True
    before = model.output.weight.detach().clone()
    _loss_and_grads(model)
    optimizer.step()
    assert not torch.equal(model.output.weight, before)
