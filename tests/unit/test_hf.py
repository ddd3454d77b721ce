"""Hugging Face round trip, one process: export loaded by transformers, init_from an HF folder,
and the refusals. Logits must match `transformers.LlamaForCausalLM` within 1e-4 (float32).

Shape legend: B batch, L sequence, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from distrib import checkpoint as ckpt
from distrib.cli import main
from distrib.commands.export import export_run
from distrib.config import CheckpointConfig, Config, ModelConfig, to_dict
from distrib.data.tokenizer import Tokenizer, train_bpe
from distrib.errors import CheckpointError, ConfigError, ExportError
from distrib.models.hf import hf_config, init_from_model_config, model_config_from_hf
from distrib.models.hf_families import legacy_config_keys
from distrib.models.transformer import Transformer
from distrib.parallel.activation import apply_ac
from distrib.parallel.init import load_hf_weights, materialize
from tests.support.tiny import tiny_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 300  # a byte-level BPE needs 257 tokens; a few merges on top
ATOL = 1e-4
TEXT = (
    "def add(a, b):\n    return a + b  # <|endoftext|> inside\n\nclass Foo:\n    s = 'héllo ✓ 𝛑'\n"
)


def tiny_cfg(**overrides: object) -> ModelConfig:
    """The tiny model (grouped-query attention, 4 query / 2 KV heads) with this file's tokenizer's
    vocabulary, and RoPE base and norm epsilon off their defaults so a mix-up would show."""
    base = {"vocab_size": V, "rope_theta": 500.0, "norm_eps": 1e-6, "attention": "eager"}
    return tiny_config(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int, activation_checkpoint: str = "none") -> Transformer:
    """The trainer's path in one process: meta build, wrappers, materialize."""
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_ac(model, activation_checkpoint)
    materialize(model, torch.device("cpu"), seed)
    with torch.no_grad():  # norms at one would hide a norm mix-up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def random_hf(cfg: ModelConfig, folder: Path, max_shard_size: str = "5GB") -> torch.nn.Module:
    """A random LlamaForCausalLM of `cfg`'s shape (norms randomized), saved to `folder`."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    return hf


def tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tied(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([TEXT] * 20, V).save(path)
    return path


def make_run(run_dir: Path, cfg: ModelConfig, tokenizer_file: Path) -> Transformer:
    """A run folder as training leaves it: config.json, tokenizer.json, one checkpoint."""
    full = Config(model=cfg)
    full.data.seq_len = cfg.max_seq_len
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(full)))
    (run_dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    model = build(cfg, seed=3)
    ckpt.Checkpointer(CheckpointConfig(), run_dir).save(5, {"model": ckpt.ModelState(model)})
    return model


# --- configs ---------------------------------------------------------------------------------------


def test_config_round_trip(tied: bool) -> None:
    cfg = tiny_cfg(tie_embeddings=tied)
    back = model_config_from_hf(hf_config(cfg))
    assert back == dataclasses.replace(cfg, attention="auto")
    assert model_config_from_hf(hf_config(cfg).to_dict()) == back
    # transformers 4.x wrote rope_theta at the top level and no rope_parameters.
    v4 = {k: v for k, v in hf_config(cfg).to_dict().items() if k != "rope_parameters"}
    assert model_config_from_hf({**v4, "rope_theta": 500.0, "rope_scaling": None}) == back


# A YaRN config as transformers writes it: max_position_embeddings (64) = factor x original.
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 500.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": "linear", "rope_factor": 2.0},
        {"rope_scaling": "llama3", "rope_factor": 4.0, "rope_original_max_seq_len": 16},
        {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_seq_len": 16},
        {
            "rope_scaling": "yarn",
            "rope_factor": 4.0,
            "rope_original_max_seq_len": 16,
            "rope_beta_fast": 16.0,
            "rope_beta_slow": 2.0,
            "rope_attention_factor": 1.25,
        },
    ],
    ids=["linear", "llama3", "yarn", "yarn-explicit"],
)
def test_rope_scaling_round_trip(rope: dict) -> None:
    """Each scheme's keys go to HF's rope_parameters (5.x) and rope_scaling (4.x) and back."""
    cfg = tiny_cfg(**rope)
    back = model_config_from_hf(hf_config(cfg))
    assert back == dataclasses.replace(cfg, attention="auto")
    exported = hf_config(cfg).to_dict()
    assert exported["rope_parameters"]["rope_type"] == rope["rope_scaling"]
    v4 = {k: v for k, v in exported.items() if k != "rope_parameters"}
    scaling = legacy_config_keys(cfg)["rope_scaling"]
    assert model_config_from_hf({**v4, "rope_theta": 500.0, "rope_scaling": scaling}) == back
    hf = transformers.LlamaForCausalLM(hf_config(cfg)).model.rotary_emb
    attention_factor = rope.get("rope_attention_factor", 0.1 * math.log(4.0) + 1)
    assert hf.attention_scaling == (attention_factor if rope["rope_scaling"] == "yarn" else 1.0)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {**_YARN, "rope_type": "dynamic"}}, "rope_type"),
        ({"rope_parameters": {**_YARN, "truncate": False}}, "truncate"),
        ({"rope_parameters": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}, "mscale_all_dim"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0}}, "factor"),
    ],
)
def test_unsupported_architecture_names_field(change: dict, field: str) -> None:
    raw = {**hf_config(tiny_cfg()).to_dict(), **change}
    with pytest.raises(CheckpointError, match=field):
        model_config_from_hf(raw)


# --- export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tie, n_kv_heads, shard",
    [(True, 2, False), (False, 2, True), (False, 4, False)],
    ids=["tied-gqa", "untied-gqa-sharded", "untied-mha"],
)
def test_export_loads_in_transformers(
    tmp_path: Path, tokenizer_file: Path, tie: bool, n_kv_heads: int, shard: bool
) -> None:
    cfg = tiny_cfg(tie_embeddings=tie, n_kv_heads=n_kv_heads)
    model = make_run(tmp_path / "run", cfg, tokenizer_file)
    out = tmp_path / "hf"
    if shard:  # small shards exercise the index that large models get
        export_run(tmp_path / "run", out, max_shard_size="40KB")
        assert (out / "model.safetensors.index.json").is_file()
    else:
        assert main(["export", "--run_dir", str(tmp_path / "run"), "--format", "hf", str(out)]) == 0
        assert (out / "model.safetensors").is_file()
    assert (out / "generation_config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert hf.config.tie_word_embeddings == tie
    with torch.no_grad():
        expected_BLV, got_BLV = model(tokens()), hf(input_ids=tokens()).logits
    torch.testing.assert_close(got_BLV, expected_BLV, rtol=0, atol=ATOL)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(tokenizer_file)
    text = TEXT.replace("<|endoftext|>", "")  # ours encodes that marker as plain text, HF doesn't
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text
    assert hf_tok.eos_token_id == ours.eos_id == hf.config.eos_token_id

    # And back: init_from the export gives exactly the run's weights.
    back = build(cfg, seed=9)
    load_hf_weights([back], str(out), cfg)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_export_refusals(tmp_path: Path, tokenizer_file: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=str(run)):
        export_run(run, tmp_path / "a")  # no run folder
    make_run(run, tiny_cfg(), tokenizer_file)
    with pytest.raises(ExportError, match="gguf"):
        export_run(run, tmp_path / "a", fmt="gguf")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(ExportError, match=str(busy)):
        export_run(run, busy)
    assert main(["export", "--run_dir", str(run), "--step", "7", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


# --- import (init_from) ----------------------------------------------------------------------------


@pytest.mark.parametrize("ac", ["none", "full"])
def test_import_matches_transformers(tmp_path: Path, tied: bool, ac: str) -> None:
    cfg = tiny_cfg(tie_embeddings=tied)
    # Untied: several shards and an index, as large published checkpoints come.
    hf = random_hf(cfg, tmp_path, max_shard_size="5GB" if tied else "40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() != tied
    # A different max_seq_len is allowed: with plain RoPE it only sizes the position tables.
    model = build(dataclasses.replace(cfg, max_seq_len=48), seed=7, activation_checkpoint=ac)
    load_hf_weights([model], str(tmp_path), cfg)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    with torch.no_grad():
        expected_BLV, got_BLV = hf(input_ids=tokens()).logits, model(tokens())
    torch.testing.assert_close(got_BLV, expected_BLV, rtol=0, atol=ATOL)


def test_import_yarn_matches_keys_it_reads(tmp_path: Path) -> None:
    """A YaRN folder sets the YaRN keys; a contradicting one is refused naming both values; the
    attention factor compares as resolved (0 is the derived value written out)."""
    cfg = tiny_cfg(
        rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16, rope_beta_fast=16.0
    )
    derived = dataclasses.replace(cfg, rope_attention_factor=0.1 * math.log(4.0) + 1)
    random_hf(derived, tmp_path)
    plain = tiny_cfg(init_from=f"hf:{tmp_path}", rope_low_freq_factor=2.0)  # llama3's: not read
    got = init_from_model_config(plain, explicit={"rope_low_freq_factor"})
    assert got == dataclasses.replace(derived, init_from=plain.init_from, rope_low_freq_factor=2.0)
    with pytest.raises(ConfigError, match=r"rope_beta_fast = 32.0 contradicts .*beta_fast = 16.0"):
        init_from_model_config(plain, explicit={"rope_beta_fast"})
    model = build(cfg, seed=1)
    load_hf_weights([model], str(tmp_path), cfg)  # rope_attention_factor 0: the same factor
    with pytest.raises(CheckpointError, match="model.rope_attention_factor = 1.5 but"):
        load_hf_weights([model], str(tmp_path), dataclasses.replace(cfg, rope_attention_factor=1.5))
    with pytest.raises(CheckpointError, match="model.rope_scaling = 'linear' but .*'yarn'"):
        load_hf_weights([model], str(tmp_path), dataclasses.replace(cfg, rope_scaling="linear"))


def test_import_into_pipeline_stage(tmp_path: Path) -> None:
    """A stage holding only the last layer and the head takes just its own tensors."""
    cfg = tiny_cfg(tie_embeddings=False)
    random_hf(cfg, tmp_path)
    whole = build(cfg, seed=1)
    load_hf_weights([whole], str(tmp_path), cfg)
    with torch.device("meta"):
        stage = Transformer(cfg)
    del stage.layers["0"]
    stage.tok_embeddings = None
    materialize(stage, torch.device("cpu"), seed=2)
    load_hf_weights([stage], str(tmp_path), cfg)
    reference = dict(whole.named_parameters())
    for name, param in stage.named_parameters():
        assert torch.equal(param, reference[name]), name


def test_import_casts_bfloat16(tmp_path: Path) -> None:
    """Published checkpoints are often bfloat16; the parameters keep their own dtype."""
    cfg = tiny_cfg(tie_embeddings=False)
    hf = random_hf(cfg, tmp_path / "fp32").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = build(cfg, seed=1)
    load_hf_weights([model], str(tmp_path / "bf16"), cfg)
    assert model.layers["1"].attention.wk.weight.dtype == torch.float32
    expected = hf.model.layers[1].self_attn.k_proj.weight.float()
    assert torch.equal(model.layers["1"].attention.wk.weight, expected)


def _rewrite(folder: Path, edit) -> None:  # noqa: ANN001 - callable on the state dict
    file = folder / "model.safetensors"
    state = safetensors_torch.load_file(file)
    edit(state)
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})


def test_import_refusals(tmp_path: Path) -> None:
    cfg = tiny_cfg(tie_embeddings=False)
    random_hf(cfg, tmp_path)
    model = build(cfg, seed=1)
    mha = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    match = rf"model.n_kv_heads = {cfg.n_heads} .* num_key_value_heads = {cfg.n_kv_heads}"
    with pytest.raises(CheckpointError, match=match):
        load_hf_weights([model], str(tmp_path), mha)
    with pytest.raises(CheckpointError, match="tie_embeddings"):
        load_hf_weights([model], str(tmp_path), dataclasses.replace(cfg, tie_embeddings=True))
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(tmp_path, lambda s: s.update({name: s[name][:-1].clone()}))
    F, D = cfg.ffn_dim, cfg.dim
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[{F - 1}, {D}\].*\[{F}, {D}\]"):
        load_hf_weights([model], str(tmp_path), cfg)
    _rewrite(tmp_path, lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        load_hf_weights([model], str(tmp_path), cfg)
    _rewrite(
        tmp_path,
        lambda s: s.update({name: torch.zeros(F, D), "model.extra.bias": torch.zeros(3)}),
    )
    with pytest.raises(CheckpointError, match="unexpected tensor model.extra.bias"):
        load_hf_weights([model], str(tmp_path), cfg)
    original = (tmp_path / "config.json").read_text()
    config = json.loads(original)
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope_type"):
        load_hf_weights([model], str(tmp_path), cfg)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf_weights([model], str(tmp_path / "nowhere"), cfg)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(original)
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_hf_weights([model], str(bare), cfg)
