"""Hugging Face round trip for every family, one process, float32.

For each supported architecture a tiny random model is made with that family's transformers
config class (grouped-query attention everywhere; Qwen2 biases; Qwen3 qk-norm with a head dim
other than dim / n_heads; a sliding window shorter than the test sequence; Llama 3.1 RoPE
scaling in all three of its frequency bands, linear and YaRN scaling; Mixtral and Qwen3-MoE
with four experts, top-2, Qwen3-MoE with a leading dense layer and norm_topk_prob both ways),
saved with save_pretrained, loaded into our model from the folder (`model.init_from`'s path)
and compared with transformers' logits; then our export, loaded back by transformers, must give
the same logits.

Shape legend: B batch, L sequence, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distrib.commands.export import save_hf
from distrib.config import ConfigError
from distrib.data.tokenizer import train_bpe
from distrib.errors import CheckpointError, ExportError
from distrib.models.hf import (
    hf_config,
    init_from_model_config,
    model_config_from_hf,
    read_hf_config,
)
from distrib.models.transformer import Transformer
from distrib.parallel.init import load_hf_weights, materialize
from tests.support.tiny import tiny_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 300  # a byte-level BPE needs 257 tokens; a few merges on top
L = 24  # longer than every sliding window below
ATOL = 1e-5
BASE = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500.0,
    "tie_word_embeddings": False,
}
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head dim 8 and theta 500 the wavelengths are 6.3, 30, 140 and 660 positions: one
    # below 32 / 4 (kept), one between (interpolated), two above 32 (divided by the factor).
    "original_max_position_embeddings": 32,
}
_MOE = {"num_experts_per_tok": 2}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"rope_scaling": _LLAMA3}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True, "head_dim": 16}),
    "llama-linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # Head dim 16, theta 500, 16 original positions: frequency 0 kept, 1 blended half and
    # half, 2 to 7 divided by the factor; cos and sin times 0.1 ln 4 + 1.
    "llama-yarn": (
        "LlamaConfig",
        {
            "head_dim": 16,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-window": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0},
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": 7, **_MOE}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "num_experts": 4,
            "moe_intermediate_size": 16,
            "mlp_only_layers": [0],
            "norm_topk_prob": True,
            "head_dim": 16,
            **_MOE,
        },
    ),
    "qwen3_moe-unnormalized": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "moe_intermediate_size": 16, "norm_topk_prob": False, **_MOE},
    ),
}


def hf_cfg(case: str, **change: Any) -> Any:
    """The transformers config of `case`, with `change` applied."""
    cls, kwargs = CASES[case]
    if not hasattr(transformers, cls):  # Qwen3 and Qwen3-MoE need transformers >= 4.51
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    return getattr(transformers, cls)(**{**BASE, **kwargs, **change})


def random_hf(case: str, folder: Path, **change: Any) -> torch.nn.Module:
    """A random model of `case`, saved to `folder`: norms around one, biases and routers large
    enough to matter (a router near zero would leave top-k to rounding)."""
    torch.manual_seed(0)
    config = hf_cfg(case, **change)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    hf.save_pretrained(folder)
    return hf


def load_ours(folder: Path, attention: str = "eager", **change: Any) -> Transformer:
    """Our model for an HF folder: its config read, built on meta, materialized, loaded."""
    cfg = dataclasses.replace(read_hf_config(folder), attention=attention, **change)
    with torch.device("meta"):
        model = Transformer(cfg)
    materialize(model, torch.device("cpu"), seed=5)
    load_hf_weights([model], str(folder), cfg)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=tokens()) if hasattr(model, "config") else model(tokens())
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(["def add(a, b):\n    return a + b\n"] * 20, V).save(path)
    return path


# --- import and export, per family ---------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_matches_transformers(case: str, tmp_path: Path, tokenizer_file: Path) -> None:
    hf = random_hf(case, tmp_path / "hf")
    expected_BLV = logits(hf)
    model = load_ours(tmp_path / "hf")
    assert model.cfg.family == case.split("-")[0]
    torch.testing.assert_close(logits(model), expected_BLV, rtol=0, atol=ATOL)

    save_hf(model, tokenizer_file, tmp_path / "out", max_shard_size="5GB")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(back).__name__ == type(hf).__name__
    torch.testing.assert_close(logits(back), expected_BLV, rtol=0, atol=ATOL)
    # The export reads back into ours as the same tensors, experts restacked.
    again = load_ours(tmp_path / "out")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", ["mistral", "qwen2-window", "qwen3", "mixtral"])
def test_sdpa_backend_matches_transformers(case: str, tmp_path: Path) -> None:
    """The window goes to SDPA as an explicit mask; it must agree with HF's eager path too."""
    hf = random_hf(case, tmp_path)
    torch.testing.assert_close(logits(load_ours(tmp_path, "sdpa")), logits(hf), rtol=0, atol=ATOL)


def test_window_matters(tmp_path: Path) -> None:
    """The test sequence is longer than the window: without it the logits differ."""
    random_hf("mistral", tmp_path)
    windowed = logits(load_ours(tmp_path))
    with pytest.raises(CheckpointError, match="sliding_window"):
        load_ours(tmp_path, sliding_window=0)  # the folder's config and ours disagree
    cfg = dataclasses.replace(read_hf_config(tmp_path), sliding_window=0, attention="eager")
    full = Transformer(cfg)
    full.load_state_dict(load_ours(tmp_path).state_dict())
    assert not torch.allclose(logits(full.eval()), windowed, atol=1e-3)


def test_export_config_reads_on_transformers_4(tmp_path: Path, tokenizer_file: Path) -> None:
    """config.json also carries what transformers 4.x reads and 5.x no longer writes."""
    random_hf("qwen3_moe", tmp_path / "hf")
    save_hf(load_ours(tmp_path / "hf"), tokenizer_file, tmp_path / "out", max_shard_size="40KB")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts"] == 4 and config["rope_theta"] == 500.0
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    assert not any("gate_up_proj" in name for name in index["weight_map"])


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case: str) -> None:
    ours = model_config_from_hf(hf_cfg(case))
    assert model_config_from_hf(hf_config(ours)) == ours
    assert model_config_from_hf(hf_config(ours).to_dict()) == ours


def test_llama3_and_moe_keys() -> None:
    llama = model_config_from_hf(hf_cfg("llama"))
    assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_max_seq_len) == (
        "llama3",
        4.0,
        32,
    )
    moe = model_config_from_hf(hf_cfg("qwen3_moe"))
    assert (moe.moe_experts, moe.moe_top_k, moe.moe_ffn_dim, moe.ffn_dim) == (4, 2, 16, 48)
    assert (moe.moe_dense_layers, moe.moe_norm_topk, moe.head_dim, moe.qk_norm) == (
        1,
        True,
        16,
        True,
    )
    mixtral = model_config_from_hf(hf_cfg("mixtral"))
    assert (mixtral.ffn_dim, mixtral.moe_ffn_dim, mixtral.moe_norm_topk) == (48, 0, True)
    assert model_config_from_hf(hf_cfg("qwen2")).qkv_bias


@pytest.mark.parametrize(
    "case, change, field",
    [
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}, "use_sliding_window"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ("mistral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ("qwen2", {"rope_scaling": _LLAMA3}, "rope_scaling.rope_type = 'llama3'"),
    ],
)
def test_refuses_what_it_cannot_reproduce(case: str, change: dict, field: str) -> None:
    with pytest.raises(CheckpointError, match=field):
        model_config_from_hf(hf_cfg(case, **change))


def test_unsupported_architecture_lists_supported() -> None:
    raw = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    supported = "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, "
    with pytest.raises(CheckpointError, match=f"GPT2LMHeadModel.*{supported}Mixtral"):
        model_config_from_hf(raw)
    with pytest.raises(CheckpointError, match="model_type = 'qwen3'.*'mistral'"):
        raw = hf_cfg("mistral").to_dict()
        model_config_from_hf(
            {**raw, "architectures": ["MistralForCausalLM"], "model_type": "qwen3"}
        )


# --- init_from: the folder's config sets the model keys ---------------------------------------------


def test_init_from_sets_keys_and_refuses_contradictions(tmp_path: Path) -> None:
    random_hf("qwen3_moe", tmp_path)
    cfg = tiny_config(init_from=f"hf:{tmp_path}", max_seq_len=32, attention="sdpa")
    got = init_from_model_config(cfg, explicit={"max_seq_len", "attention"})
    expected = dataclasses.replace(read_hf_config(tmp_path), max_seq_len=32, attention="sdpa")
    assert dataclasses.replace(got, init_from="") == expected
    # An explicit key that agrees is fine; one that contradicts names both values.
    init_from_model_config(dataclasses.replace(cfg, dim=32), explicit={"dim"})
    with pytest.raises(ConfigError, match=r"model.dim = 64 contradicts .* hidden_size = 32"):
        init_from_model_config(dataclasses.replace(cfg, dim=64), explicit={"dim"})
    with pytest.raises(ConfigError, match=r"model.family = 'llama' contradicts .*Qwen3Moe"):
        init_from_model_config(cfg, explicit={"family"})
    assert init_from_model_config(tiny_config(), explicit=set()) == tiny_config()


def test_command_line_init_from_takes_the_folders_keys(tmp_path: Path) -> None:
    """What `distrib train --model.init_from=hf:DIR` loads: the folder's family and shape,
    the user's own keys kept, a contradicting one refused before anything starts."""
    from distrib.cli import _from_init_folder
    from distrib.config import load_config

    random_hf("qwen3_moe", tmp_path)
    flags = [f"--model.init_from=hf:{tmp_path}", "--model.max_seq_len=32", "--data.seq_len=32"]
    cfg = load_config(None, flags, resolve_model=_from_init_folder)
    theirs = read_hf_config(tmp_path)
    assert (cfg.model.family, cfg.model.dim, cfg.model.moe_experts) == (
        "qwen3_moe",
        theirs.dim,
        theirs.moe_experts,
    )
    assert cfg.model.max_seq_len == 32
    with pytest.raises(ConfigError, match="model.n_layers = 7 contradicts model.init_from"):
        load_config(None, [*flags, "--model.n_layers=7"], resolve_model=_from_init_folder)


def test_load_refuses_another_family_or_shape(tmp_path: Path) -> None:
    random_hf("mixtral", tmp_path)
    cfg = read_hf_config(tmp_path)
    model = load_ours(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.family = 'mistral' but .*MixtralForCausalLM"):
        load_hf_weights([model], str(tmp_path), dataclasses.replace(cfg, family="mistral"))
    with pytest.raises(CheckpointError, match="model.moe_top_k = 1 but .* num_experts_per_tok = 2"):
        load_hf_weights([model], str(tmp_path), dataclasses.replace(cfg, moe_top_k=1))
    file = tmp_path / "model.safetensors"
    state = safetensors_torch.load_file(file)
    missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del state[missing]
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{missing} is missing"):
        load_hf_weights([model], str(tmp_path), cfg)


# --- export refusals -------------------------------------------------------------------------------


def test_export_refusals(tmp_path: Path, tokenizer_file: Path) -> None:
    custom = Transformer(tiny_config(family="custom", qk_norm=True, qkv_bias=True, n_layers=1))
    with pytest.raises(ExportError, match="family = 'custom' has no Hugging Face class"):
        save_hf(custom, tokenizer_file, tmp_path / "a", max_shard_size="5GB")
    random_hf("mixtral", tmp_path / "hf")
    model = load_ours(tmp_path / "hf")
    model.layers["0"].feed_forward.expert_bias.fill_(0.5)
    with pytest.raises(ExportError, match="layers.0.feed_forward.expert_bias is not zero"):
        save_hf(model, tokenizer_file, tmp_path / "b", max_shard_size="5GB")
    bad = dataclasses.replace(model.cfg, moe_score="sigmoid")
    with pytest.raises(ExportError, match="MixtralForCausalLM: model.moe_score = 'sigmoid'"):
        hf_config(bad)
