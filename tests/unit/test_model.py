"""Unit tests for distrib.models: shapes, init, attention backends, masking, HF parity.

Shape legend: B batch, L sequence, H query heads, G kv heads, K head dim, V vocab.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distrib.models.attention as attn_mod
from distrib.config import ModelConfig
from distrib.models.attention import attention, doc_cu_seqlens, resolve_backend
from distrib.models.hf import hf_config, to_hf_name
from distrib.models.transformer import Transformer, num_params, rope_cache
from tests.support.tiny import tiny_config

REPO = Path(__file__).resolve().parents[2]
V = tiny_config().vocab_size


def tiny_cfg(**overrides: object) -> ModelConfig:
    """The tiny model on sdpa attention unless overridden."""
    return tiny_config(**{"attention": "sdpa", **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """The production path: meta build, materialize, initialize."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def with_backend(model: Transformer, backend: str) -> Transformer:
    for layer in model.layers.values():
        layer.attention.backend = backend
    return model


def two_docs(B: int, L: int, split: int) -> torch.Tensor:
    doc_ids_BL = torch.zeros(B, L, dtype=torch.long)
    doc_ids_BL[:, split:] = 1
    return doc_ids_BL


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tied(request: pytest.FixtureRequest) -> bool:
    return request.param


# --- construction, init, parameter counting -----------------------------------------------------


def test_shapes_meta_build(tied: bool) -> None:
    model = build(tiny_cfg(tie_embeddings=tied))
    assert list(model.layers.keys()) == [str(i) for i in range(model.cfg.n_layers)]
    assert all(p.device.type == "cpu" for p in model.parameters())
    tokens_BL = torch.randint(0, V, (2, 16))
    logits_BLV = model(tokens_BL)
    assert logits_BLV.shape == (2, 16, V)
    assert logits_BLV.dtype == torch.float32
    assert torch.isfinite(logits_BLV).all()
    # RoPE tables are derived state: not saved, but recomputed correctly after to_empty.
    assert not any("rope" in k for k in model.state_dict())
    cfg = model.cfg
    cos_PK, sin_PK = rope_cache(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    assert torch.equal(model.rope_cos, cos_PK) and torch.equal(model.rope_sin, sin_PK)


def test_init_deterministic_and_scaled() -> None:
    # dim 128: enough elements per matrix for the standard deviations below to be within 5%.
    cfg = tiny_cfg(tie_embeddings=False, dim=128, n_heads=4, n_kv_heads=4)
    a, b, c = build(cfg, seed=3), build(cfg, seed=3), build(cfg, seed=4)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(
        sd_a["layers.0.attention.wq.weight"], sd_c["layers.0.attention.wq.weight"]
    )
    assert torch.equal(sd_a["norm.weight"], torch.ones(cfg.dim))
    assert torch.equal(sd_a["layers.1.ffn_norm.weight"], torch.ones(cfg.dim))
    std = cfg.init_std
    assert sd_a["layers.0.attention.wq.weight"].std().item() == pytest.approx(std, rel=0.05)
    assert sd_a["output.weight"].std().item() == pytest.approx(std, rel=0.05)
    out_std = std / (2 * cfg.n_layers) ** 0.5
    assert sd_a["layers.0.feed_forward.w2.weight"].std().item() == pytest.approx(out_std, rel=0.05)
    assert sd_a["layers.1.attention.wo.weight"].std().item() == pytest.approx(out_std, rel=0.05)


def test_tied_embeddings_survive_meta_init_and_count_once() -> None:
    model = build(tiny_cfg(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    shared = [p for p in model.parameters() if p is model.tok_embeddings.weight]
    assert len(shared) == 1
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_num_params_hand_counted() -> None:
    cfg = tiny_cfg()
    D, F, H, G, n_layers = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers
    K = D // H
    # wq [H*K, D], wk and wv [G*K, D], wo [D, H*K]; w1, w3 [F, D] and w2 [D, F]; two norms [D].
    per_layer = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F + 2 * D
    body = n_layers * per_layer + D  # blocks + final norm
    tied_model = build(tiny_cfg(tie_embeddings=True))
    untied_model = build(tiny_cfg(tie_embeddings=False))
    assert num_params(tied_model) == body + V * D
    assert num_params(untied_model) == body + 2 * V * D
    # Without the input lookup table, both variants count the output projection's V * D once.
    assert num_params(untied_model, exclude_embeddings=True) == body + V * D
    assert num_params(tied_model, exclude_embeddings=True) == body + V * D


def test_pipeline_cut_stages_compose() -> None:
    model = build(tiny_cfg(tie_embeddings=False))
    tokens_BL = torch.randint(0, V, (2, 12))
    stage0, stage1 = copy.deepcopy(model), copy.deepcopy(model)
    n_layers = model.cfg.n_layers
    cut = n_layers // 2
    for i in range(cut, n_layers):
        del stage0.layers[str(i)]
    stage0.norm = stage0.output = None
    for i in range(cut):
        del stage1.layers[str(i)]
    stage1.tok_embeddings = None
    h_BLD = stage0(tokens_BL)
    assert h_BLD.shape == (2, 12, model.cfg.dim)
    assert list(stage1.layers.keys()) == [str(i) for i in range(cut, n_layers)]
    torch.testing.assert_close(stage1(h_BLD), model(tokens_BL), rtol=0, atol=0)


def test_too_long_sequence_raises() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        build(tiny_cfg(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


# --- attention backends ----------------------------------------------------------------------------


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert resolve_backend("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="flash") as err:
        resolve_backend("flash", "cpu")
    assert "sdpa" in str(err.value) and "eager" in str(err.value)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")
    monkeypatch.setattr(attn_mod, "_flash_importable", lambda: True)
    assert resolve_backend("auto", "cuda") == "flash"
    assert resolve_backend("auto", "cpu") == "sdpa"
    monkeypatch.setattr(attn_mod, "_flash_importable", lambda: False)
    assert resolve_backend("auto", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="flash_attn"):
        resolve_backend("flash", "cuda")


def random_qkv(B: int = 2, H: int = 4, G: int = 2, L: int = 24, K: int = 16) -> tuple:
    g = torch.Generator().manual_seed(0)
    q_BHLK = torch.randn(B, H, L, K, generator=g)
    k_BGLK = torch.randn(B, G, L, K, generator=g)
    v_BGLK = torch.randn(B, G, L, K, generator=g)
    return q_BHLK, k_BGLK, v_BGLK


@pytest.mark.parametrize("G", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("with_docs", [False, True], ids=["nodocs", "docs"])
def test_eager_matches_sdpa(G: int, with_docs: bool) -> None:
    q, k, v = random_qkv(G=G)
    doc_ids_BL = None
    if with_docs:
        doc_ids_BL = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [4] * 20 + [9] * 4])
    eager_BHLK = attention(q, k, v, "eager", doc_ids_BL)
    assert eager_BHLK.shape == q.shape
    torch.testing.assert_close(
        attention(q, k, v, "sdpa", doc_ids_BL), eager_BHLK, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        attention(q, k, v, "auto", doc_ids_BL), eager_BHLK, rtol=0, atol=1e-5
    )


def test_attention_rejects_bad_shapes() -> None:
    q, k, v = random_qkv(H=4, G=3)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v, "sdpa")
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match="doc_ids_BL"):
        attention(q, k, v, "sdpa", torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("with_docs", [False, True], ids=["nodocs", "docs"])
def test_model_eager_matches_sdpa(with_docs: bool) -> None:
    model = build(tiny_cfg())
    tokens_BL = torch.randint(0, V, (2, 20))
    doc_ids_BL = two_docs(2, 20, 7) if with_docs else None
    sdpa_BLV = model(tokens_BL, doc_ids_BL)
    eager_BLV = with_backend(model, "eager")(tokens_BL, doc_ids_BL)
    torch.testing.assert_close(sdpa_BLV, eager_BLV, rtol=0, atol=1e-5)


def test_doc_cu_seqlens() -> None:
    # Row starts always start a segment, even when the doc id continues from the previous row.
    doc_ids_BL = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2], [3, 3, 3, 3, 3]])
    cu_seqlens_S, max_seqlen = doc_cu_seqlens(doc_ids_BL)
    assert cu_seqlens_S.dtype == torch.int32
    assert cu_seqlens_S.tolist() == [0, 2, 5, 7, 10, 15]
    assert max_seqlen == 5


# --- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_document_masking(backend: str) -> None:
    model = with_backend(build(tiny_cfg()), backend)
    L, split = 20, 8
    tokens_BL = torch.randint(0, V, (1, L))
    perturbed_BL = tokens_BL.clone()
    perturbed_BL[0, :split] = (perturbed_BL[0, :split] + 1) % V
    doc_ids_BL = two_docs(1, L, split)
    base_BLV, pert_BLV = model(tokens_BL, doc_ids_BL), model(perturbed_BL, doc_ids_BL)
    torch.testing.assert_close(pert_BLV[:, split:], base_BLV[:, split:], rtol=0, atol=1e-6)
    # Positions are not reset per document, but RoPE only sees relative offsets: document 2
    # alone, starting at position 0, gives the same logits up to rounding.
    alone_BLV = model(tokens_BL[:, split:])
    torch.testing.assert_close(base_BLV[:, split:], alone_BLV, rtol=0, atol=1e-4)
    # Without doc ids attention crosses documents, so the perturbation must show.
    assert (model(perturbed_BL)[:, split:] - model(tokens_BL)[:, split:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("with_docs", [False, True], ids=["nodocs", "docs"])
def test_causality(backend: str, with_docs: bool) -> None:
    model = with_backend(build(tiny_cfg()), backend)
    L, t = 16, 10
    tokens_BL = torch.randint(0, V, (2, L))
    perturbed_BL = tokens_BL.clone()
    perturbed_BL[:, t] = (perturbed_BL[:, t] + 1) % V
    doc_ids_BL = two_docs(2, L, 5) if with_docs else None
    base_BLV, pert_BLV = model(tokens_BL, doc_ids_BL), model(perturbed_BL, doc_ids_BL)
    torch.testing.assert_close(pert_BLV[:, :t], base_BLV[:, :t], rtol=0, atol=1e-6)
    assert (pert_BLV[:, t:] - base_BLV[:, t:]).abs().max() > 1e-3


# --- parity with Hugging Face ----------------------------------------------------------------------


def copy_from_hf(model: Transformer, hf: torch.nn.Module) -> None:
    """Load HF LlamaForCausalLM weights by name; q/k need no permutation (rotate_half RoPE)."""
    theirs = hf.state_dict()
    names = [n for n, _ in model.named_parameters()]  # a tied head is listed once
    missing, unexpected = model.load_state_dict(
        {name: theirs[to_hf_name(name)] for name in names}, strict=False
    )
    assert not unexpected and all(m not in names for m in missing)


def test_matches_hf_llama(tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(tie_embeddings=tied, rope_theta=500.0, norm_eps=1e-6, attention="eager")
    hf_cfg = hf_config(cfg, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    # HF's default init leaves norms at one; randomize them so a norm mix-up would show.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = build(cfg, seed=1)
    copy_from_hf(model, hf)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    tokens_BL = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        expected_BLV = hf(input_ids=tokens_BL).logits
        got_BLV = model(tokens_BL)
        got_sdpa_BLV = with_backend(model, "sdpa")(tokens_BL)
    torch.testing.assert_close(got_BLV, expected_BLV, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sdpa_BLV, expected_BLV, rtol=0, atol=1e-5)


# --- hygiene and GPU -------------------------------------------------------------------------------


def test_models_do_not_import_torch_distributed() -> None:
    # `import torch` (and torch.compile's machinery, which attention.py uses) already pulls in
    # a few torch.distributed modules, so compare before/after.
    code = (
        "import sys, torch, torch._dynamo\n"
        "before = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "import distrib.models, distrib.models.transformer, distrib.models.attention\n"
        "after = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "assert after == before, sorted(after - before)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    # Also catch lazy imports inside functions, which the subprocess check cannot see.
    banned = re.compile(
        r"^\s*(import torch\.distributed|from torch(\.distributed| import distributed))", re.M
    )
    for path in (REPO / "distrib" / "models").glob("*.py"):
        assert not banned.search(path.read_text()), f"{path.name} imports torch.distributed"


def test_init_depends_only_on_seed_and_name() -> None:
    """A pipeline stage (some layers, no head) gets exactly the full model's initial values."""
    cfg = tiny_config()
    # The stage below: layers 2 and 3 and an untied head, no embedding.
    assert cfg.n_layers == 4 and not cfg.tie_embeddings
    full = Transformer(cfg)
    full.init_weights(seed=3)
    with torch.device("meta"):
        stage = Transformer(cfg)
    for i in ("0", "1"):
        del stage.layers[i]
    stage.tok_embeddings = None
    stage.to_empty(device="cpu")
    stage.init_weights(seed=3)
    reference = dict(full.named_parameters())
    for name, param in stage.named_parameters():
        assert torch.equal(param, reference[name]), name
    value = full.initial_value(
        "layers.2.attention.wo.weight", torch.Size([cfg.dim, cfg.dim]), torch.device("cpu"), 3
    )
    assert torch.equal(value, reference["layers.2.attention.wo.weight"])
