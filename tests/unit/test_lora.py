"""LoRA in one process: adapters on a frozen Hugging Face base, what trains, what a checkpoint
holds, resuming on the same (or a changed) base, merging, and both exports (merged HF folder,
peft adapter folder) against transformers and peft (logits within 1e-5, float32).

Shape legend: B batch, L sequence, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from distrib import checkpoint as ckpt
from distrib.checkpoint.lora_base import BASE_KEY
from distrib.commands.export import export_run
from distrib.config import CheckpointConfig, Config, LoraConfig, ModelConfig, to_dict
from distrib.config.validate import validate
from distrib.data.loader import Batch
from distrib.data.tokenizer import train_bpe
from distrib.engines.build import build_engine
from distrib.engines.native import NativeEngine
from distrib.errors import CheckpointError, ConfigError, ExportError
from distrib.models.build import build_on_meta
from distrib.models.hf import hf_config
from distrib.models.lora import LoRALinear, apply_lora, is_adapter, merge_lora
from distrib.parallel.init import materialize
from distrib.runtime import Runtime, detect_launch
from tests.support.tiny import tiny_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 300  # a byte-level BPE needs 257 tokens; a few merges on top
ATOL = 1e-5
RANK, ALPHA = 4, 8.0
TARGETS = "all,output"  # every kind of layer, the head included (untied)
STEPS = 3


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(["def add(a, b):\n    return a + b\n"] * 20, V).save(path)
    return path


def _hf_model_config(**overrides: object) -> ModelConfig:
    return tiny_config(vocab_size=V, attention="eager", n_layers=2, **overrides)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM of the tiny shape (norms randomized too), saved."""
    folder = tmp_path_factory.mktemp("hf_base")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(_hf_model_config()))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    return folder


def lora_config(base: Path, **lora: object) -> Config:
    cfg = Config(model=_hf_model_config(init_from=f"hf:{base}"))
    cfg.lora = dataclasses.replace(LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS), **lora)
    cfg.data.seq_len = 16
    t = cfg.training
    t.global_batch_size, t.micro_batch_size, t.lr, t.warmup_steps, t.steps = 4, 2, 1e-2, 1, 10
    validate(cfg)
    return cfg


def engine_of(cfg: Config) -> NativeEngine:
    engine, _, _ = build_engine(cfg, Runtime(detect_launch({}), torch.device("cpu")))
    assert isinstance(engine, NativeEngine)
    return engine


def batches(step: int, n: int = 2) -> list[Batch]:
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, V, (2, 17), generator=gen)
        out.append(Batch(tokens[:, :-1], tokens[:, 1:]))
    return out


def tokens_BL() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    return model(tokens_BL()).float()


def tensors(model: nn.Module, adapters: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter(n) == adapters}


@pytest.fixture(scope="module")
def trained(hf_base: Path) -> tuple[Config, NativeEngine, dict[str, torch.Tensor]]:
    """A LoRA engine after STEPS steps, and its base weights as they were before training."""
    cfg = lora_config(hf_base)
    engine = engine_of(cfg)
    base = tensors(engine.model, adapters=False)
    for step in range(STEPS):
        result = engine.train_step(batches(step))
        assert torch.isfinite(result.loss)
    return cfg, engine, base


def make_run(run_dir: Path, cfg: Config, engine: NativeEngine, tokenizer_file: Path) -> Path:
    """A run folder as training leaves it: config.json, tokenizer.json, one checkpoint."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run_dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    checkpointer = ckpt.Checkpointer(CheckpointConfig(), run_dir, {"config": to_dict(cfg)})
    return checkpointer.save(STEPS, engine.checkpoint_state())


# --- the module --------------------------------------------------------------------------------


def test_adapters_start_as_the_base_and_are_layout_invariant(hf_base: Path) -> None:
    cfg = lora_config(hf_base)
    plain = engine_of(dataclasses.replace(cfg, lora=LoraConfig())).model
    engine = engine_of(cfg)
    torch.testing.assert_close(logits(engine.model), logits(plain), atol=0, rtol=0)
    layers = {n: m for n, m in engine.model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 2 * 7 + 1  # seven linears per block, and the head
    wq = layers["layers.0.attention.wq"]
    assert wq.weight.dtype == torch.float32 and wq.scaling == ALPHA / RANK
    assert not wq.weight.requires_grad and wq.lora_a.requires_grad
    assert bool(wq.lora_a.ne(0).any()) and not bool(wq.lora_b.ne(0).any())
    # The initial values depend on the seed and the name only: a second build draws the same.
    again = engine_of(cfg).model.get_parameter("layers.1.feed_forward.w2.lora_a")
    assert torch.equal(again, engine.model.get_parameter("layers.1.feed_forward.w2.lora_a"))


def test_training_changes_only_the_adapters(
    trained: tuple[Config, NativeEngine, dict[str, torch.Tensor]],
) -> None:
    _, engine, base = trained
    after = tensors(engine.model, adapters=False)
    assert after.keys() == base.keys() and base
    for name, tensor in base.items():
        assert torch.equal(after[name], tensor), f"{name} changed"
    adapters = tensors(engine.model, adapters=True)
    assert all(bool(t.ne(0).any()) for n, t in adapters.items() if n.endswith("lora_b"))
    # The optimizer holds the adapters and nothing else, moments included.
    (optimizer,) = engine.optimizers
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    by_id = {id(p): n for n, p in engine.model.named_parameters()}
    assert sorted(by_id[i] for i in held) == sorted(adapters)
    assert {by_id[id(p)] for p in optimizer.state} == set(adapters)


def test_merge_gives_the_same_logits(
    trained: tuple[Config, NativeEngine, dict[str, torch.Tensor]], hf_base: Path
) -> None:
    cfg, engine, _ = trained
    model = build_on_meta(cfg.model)
    apply_lora(model, cfg.lora)
    materialize(model, torch.device("cpu"), 0)
    model.load_state_dict(engine.model.state_dict())
    before = logits(model)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any(is_adapter(n) for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), before, atol=ATOL, rtol=0)


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_holds_only_adapters_and_resumes(
    trained: tuple[Config, NativeEngine, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    cfg, engine, _ = trained
    checkpointer = ckpt.Checkpointer(CheckpointConfig(), tmp_path, {"config": to_dict(cfg)})
    path = checkpointer.save(STEPS, engine.checkpoint_state())
    keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys == set(tensors(engine.model, adapters=True))
    optimizer_keys = [k for k in keys if k.startswith("optimizer.state.")]
    assert optimizer_keys and all(".lora_a." in k or ".lora_b." in k for k in optimizer_keys)
    record = ckpt.manifest.read(path)[BASE_KEY]
    assert record["init_from"] == cfg.model.init_from and len(record["sha256"]) == 64
    # Resume: the base again from init_from, the adapters and their moments from the checkpoint.
    fresh = engine_of(cfg)
    ckpt.Checkpointer(CheckpointConfig(), tmp_path, {"config": to_dict(cfg)}).load(
        path, fresh.checkpoint_state()
    )
    for name, tensor in tensors(engine.model, adapters=True).items():
        assert torch.equal(fresh.model.get_parameter(name), tensor), name
    moments = {id(p): state for p, state in engine.optimizers[0].state.items()}
    restored = fresh.optimizers[0].state
    for p, q in zip(engine.model.parameters(), fresh.model.parameters(), strict=True):
        if id(p) in moments:
            torch.testing.assert_close(restored[q]["exp_avg"], moments[id(p)]["exp_avg"])
    assert fresh.schedulers[0].last_epoch == STEPS


def test_resume_refuses_a_changed_base_or_other_adapters(
    hf_base: Path, tokenizer_file: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(hf_base, base)
    cfg = lora_config(base)
    engine = engine_of(cfg)
    path = ckpt.Checkpointer(CheckpointConfig(), tmp_path, {"config": to_dict(cfg)}).save(
        1, engine.checkpoint_state()
    )
    other = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=2))
    with pytest.raises(CheckpointError, match="lora.rank = 4.*this run has lora.rank = 2"):
        ckpt.Checkpointer(CheckpointConfig(), tmp_path, {"config": to_dict(other)}).load(
            path, engine_of(other).checkpoint_state()
        )
    # The same folder, other weights (a different model saved over it).
    weights = safetensors_torch.load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    safetensors_torch.save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="trained on other base weights"):
        ckpt.Checkpointer(CheckpointConfig(), tmp_path, {"config": to_dict(cfg)}).load(
            path, engine.checkpoint_state()
        )


# --- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(
    trained: tuple[Config, NativeEngine, dict[str, torch.Tensor]],
    tokenizer_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    cfg, engine, _ = trained
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    make_run(run_dir, cfg, engine, tokenizer_file)
    return run_dir


def test_export_hf_merges_the_adapters(
    trained: tuple[Config, NativeEngine, dict[str, torch.Tensor]], lora_run: Path, tmp_path: Path
) -> None:
    _, engine, _ = trained
    out = export_run(lora_run, tmp_path / "hf", fmt="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf.eval()(input_ids=tokens_BL()).logits.float()
    torch.testing.assert_close(theirs, logits(engine.model), atol=ATOL, rtol=0)
    assert not any("lora" in k for k in safetensors_torch.load_file(out / "model.safetensors"))


def test_export_peft_loads_onto_the_base(
    trained: tuple[Config, NativeEngine, dict[str, torch.Tensor]],
    lora_run: Path,
    hf_base: Path,
    tmp_path: Path,
) -> None:
    _, engine, _ = trained
    out = export_run(lora_run, tmp_path / "peft", fmt="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    keys = safetensors_torch.load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, attn_implementation="eager")
    tuned = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = tuned(input_ids=tokens_BL()).logits.float()
    torch.testing.assert_close(theirs, logits(engine.model), atol=ATOL, rtol=0)


def test_export_peft_needs_a_lora_run(hf_base: Path, tokenizer_file: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(lora_config(hf_base), lora=LoraConfig())
    engine = engine_of(cfg)
    make_run(tmp_path / "run", cfg, engine, tokenizer_file)
    with pytest.raises(ExportError, match="lora.rank = 0"):
        export_run(tmp_path / "run", tmp_path / "out", fmt="peft")


def test_a_lora_run_is_no_base_to_start_from(lora_run: Path, hf_base: Path) -> None:
    cfg = lora_config(hf_base)
    cfg.model.init_from = f"run:{lora_run}"
    with pytest.raises(ConfigError, match="trained LoRA adapters"):
        engine_of(cfg)


def test_lora_on_a_run_source(hf_base: Path, tokenizer_file: Path, tmp_path: Path) -> None:
    """init_from = run:DIR (a full run) as the base: its manifest is the base's digest."""
    plain_cfg = dataclasses.replace(lora_config(hf_base), lora=LoraConfig())
    make_run(tmp_path / "base_run", plain_cfg, engine_of(plain_cfg), tokenizer_file)
    cfg = lora_config(hf_base)
    cfg.model.init_from = f"run:{tmp_path / 'base_run'}"
    engine = engine_of(cfg)
    torch.testing.assert_close(logits(engine.model), logits(engine_of(plain_cfg).model))
    checkpointer = ckpt.Checkpointer(CheckpointConfig(), tmp_path, {"config": to_dict(cfg)})
    record = checkpointer.info[BASE_KEY]
    assert record["source"].endswith(f"step-{STEPS:08d}")


# --- config ------------------------------------------------------------------------------------


def test_base_dtype_bfloat16(hf_base: Path) -> None:
    cfg = lora_config(hf_base, targets="wq,wv")
    cfg.lora.base_dtype, cfg.training.dtype = "bfloat16", "bfloat16"
    validate(cfg)
    engine = engine_of(cfg)
    dtypes = {n: p.dtype for n, p in engine.model.named_parameters()}
    assert {d for n, d in dtypes.items() if is_adapter(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not is_adapter(n)} == {torch.bfloat16}
    assert torch.isfinite(engine.train_step(batches(0)).loss)


def test_unknown_target_lists_the_valid_ones() -> None:
    model = build_on_meta(tiny_config())
    with pytest.raises(ConfigError, match="unknown layer 'q_proj'; valid: wq, wk, wv, wo"):
        apply_lora(model, LoraConfig(rank=2, targets="wq,q_proj"))


def test_moe_models_get_attention_adapters_only() -> None:
    cfg = tiny_config(moe_experts=4, moe_top_k=2, n_layers=2, attention="eager")
    model = build_on_meta(cfg)
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        apply_lora(model, LoraConfig(rank=2, targets="wq,w1"))
    assert len(apply_lora(model, LoraConfig(rank=2, targets="wq,wo"))) == 4
    materialize(model, torch.device("cpu"), 0)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model.init_from": ""}, "model.init_from is empty"),
        ({"lora.rank": -1}, "lora.rank must be >= 0"),
        ({"lora.alpha": 0.0}, "lora.alpha must be > 0"),
        ({"lora.dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
        ({"lora.targets": "wq,qkv"}, "unknown layer 'qkv'"),
        (
            {"model.family": "custom", "model.moe_experts": 4, "lora.targets": "all"},
            "Mixture-of-Experts",
        ),
        ({"model.tie_embeddings": True}, "tie_embeddings = true"),
        ({"training.loss_chunk_tokens": 8}, "loss_chunk_tokens"),
        ({"lora.base_dtype": "bfloat16"}, "training.dtype = 'bfloat16'"),
        (
            {
                "parallel.ep": 2,
                "parallel.dp_shard": 2,
                "model.family": "custom",
                "model.moe_experts": 4,
                "lora.targets": "wq",
            },
            "parallel.ep",
        ),
        ({"parallel.pp": 2, "lora.targets": "output"}, "parallel.pp"),
    ],
)
def test_config_refusals(change: dict[str, object], message: str) -> None:
    cfg = Config(model=_hf_model_config(init_from="hf:/somewhere"))
    cfg.lora = LoraConfig(rank=RANK, targets=TARGETS)
    cfg.data.seq_len = 16
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
