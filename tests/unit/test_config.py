"""Config: defaults < TOML < overrides, and every way a config can be wrong."""

from pathlib import Path

import pytest

from distrib.cli import main
from distrib.config import (
    Config,
    ConfigError,
    from_dict,
    help_lines,
    load_config,
    parse_overrides,
    to_dict,
)
from distrib.config.rules import grad_accum_steps

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    # A -1 degree fills the world; at the smallest world the config is meant for it is 1.
    dp = max(cfg.parallel.dp_replicate, 1) * max(cfg.parallel.dp_shard, 1)
    assert grad_accum_steps(cfg.training, dp) >= 1


def test_shipped_configs_cover_debug_1b_8b() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"debug", "llama3_1b", "llama3_8b"} <= names


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\ndim = 128\nn_heads = 4\n[training]\nlr = 1e-3\nsteps = 7\n")
    cfg = load_config(path, ["--model.dim=64", "--training.steps", "9", "--data.seq_len=128"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.training.lr) == (64, 4, 1e-3)
    assert (cfg.training.steps, cfg.data.seq_len) == (9, 128)


def test_override_types() -> None:
    cfg = load_config(
        None, ["--model.tie_embeddings=false", "--model.rope_theta=5e5", "--job.run_dir=x/y"]
    )
    assert cfg.model.tie_embeddings is False
    assert cfg.model.rope_theta == 500000.0
    assert cfg.job.run_dir == "x/y"


def test_int_in_toml_becomes_float(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[training]\nlr = 1\nmin_lr = 0\n")
    assert load_config(path).training.lr == 1.0


def test_parse_overrides_forms() -> None:
    assert parse_overrides(["--a.b=1", "--c.d", "2"]) == [("a.b", "1"), ("c.d", "2")]
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["a.b=1"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--model.dimm=3"], "unknown key 'model.dimm': did you mean 'model.dim'"),
        (["--modle.dim=3"], "unknown section 'modle'.*did you mean 'model'"),
        (["--model.dim=abc"], "model.dim: expected int, got 'abc'"),
        (["--model.tie_embeddings=maybe"], "model.tie_embeddings: expected bool"),
        (["--model.n_kv_heads=3"], r"n_heads \(8\) must be divisible by model.n_kv_heads \(3\)"),
        (["--data.seq_len=1024"], r"data.seq_len \(1024\) exceeds model.max_seq_len \(512\)"),
        (["--model.attention=flsh"], "model.attention = 'flsh' is not valid: did you mean 'flash'"),
        (["--training.schedule=cos"], "valid: cosine, linear, wsd, constant"),
        (["--training.dtype=fp16"], "valid: float32, bfloat16"),
        (["--training.global_batch_size=12"], r"global_batch_size \(12\) is not a multiple"),
        (["--training.min_lr=1"], "min_lr"),
        (["--training.warmup_steps=-1"], "warmup_steps must be >= 0"),
        (["--data.val_fraction=1.5"], "val_fraction"),
        (["--model.dim=0"], "model.dim must be positive"),
        (["--parallel.engine=deepspeed", "--parallel.tp=2"], "parallel.tp must be 1"),
        (["--parallel.offload_optimizer=true"], "needs parallel.engine = 'deepspeed'"),
        (
            ["--parallel.engine=deepspeed", "--parallel.offload_params=true"],
            "offload_params needs parallel.zero_stage = 3",
        ),
        (["--parallel.zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
        (
            ["--parallel.engine=deepspeed", "--checkpoint.async=true"],
            "not supported with parallel.engine = 'deepspeed'",
        ),
        (["--training.on_nonfinite=ignore"], "valid: skip, rollback, abort"),
        (["--training.spike_threshold=0.5"], "spike_threshold must be 0"),
        (["--model.init_from=/some/folder"], "expected 'hf:/path/to/folder'"),
        (["--parallel.engine=megatron"], "valid: native, deepspeed"),
        (["--checkpoint.keep=-1"], "checkpoint.keep"),
        (["--training.loss_chunk_tokens=-1"], "loss_chunk_tokens must be >= 0"),
        (
            ["--training.loss_chunk_tokens=64", "--parallel.pp=2", "--model.tie_embeddings=false"],
            "loss_chunk_tokens > 0 needs parallel.tp = 1 and parallel.pp = 1",
        ),
        (
            [
                "--training.loss_chunk_tokens=64",
                "--parallel.engine=deepspeed",
                "--parallel.zero_stage=3",
            ],
            "cannot run under DeepSpeed ZeRO-3",
        ),
        (
            ["--training.float8=true", "--parallel.engine=deepspeed"],
            "float8 = true needs parallel.engine = 'native'",
        ),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('[model]\ndim = "big"\n')
    with pytest.raises(ConfigError, match="model.dim: expected int, got str"):
        load_config(wrong_type)
    not_table = tmp_path / "flat.toml"
    not_table.write_text("dim = 3\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        load_config(not_table)


def test_grad_accum() -> None:
    cfg = load_config(None, ["--training.global_batch_size=32", "--training.micro_batch_size=4"])
    assert grad_accum_steps(cfg.training, 1) == 8
    assert grad_accum_steps(cfg.training, 4) == 2
    with pytest.raises(ConfigError, match="valid global batch sizes include"):
        grad_accum_steps(cfg.training, 3)


def test_help_lists_every_key() -> None:
    text = "\n".join(help_lines())
    for key in ("--model.n_kv_heads", "--training.global_batch_size", "--checkpoint.resume"):
        assert key in text


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_cli_exits_2_on_config_errors(
    command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main([command, "--model.n_headz=4", f"--data.dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.n_headz': did you mean 'model.n_heads'" in err
    assert "Traceback" not in err


def test_checkpoint_async_alias(tmp_path: Path) -> None:
    assert load_config(None, ["--checkpoint.async=true"]).checkpoint.async_save
    toml = tmp_path / "c.toml"
    toml.write_text("[checkpoint]\nasync = true\n")
    assert load_config(toml).checkpoint.async_save


def test_float8_without_torchao_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="training.float8 = true needs torchao"):
        load_config(None, ["--training.float8=true"])
