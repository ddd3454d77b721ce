"""User errors end in one line and exit 2, never a traceback (issue 14): non-finite config
numbers, a layout that does not fit the launch, bad `distrib generate` flags; and progress output
that stays readable off a terminal."""

from __future__ import annotations

import dataclasses
import io
import socket
import sys
from pathlib import Path

import pytest

from distrib.cli import main
from distrib.config import ConfigError, MetricsConfig, load_config
from distrib.config.sections import SECTIONS, base_type
from distrib.train.metrics import MetricsLogger

FLOAT_KEYS = [
    f"{section}.{f.name}"
    for section, kind in SECTIONS.items()
    for f in dataclasses.fields(kind)
    if base_type(section, f.name) is float
]

# Variables by which a launcher around the test run would describe its own processes.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "PMIX_SIZE",
)


def _user_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """`distrib ARGV` in-process: exit code 2 and one error line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and "error: " in err
    return err


# --- 1. every float key must be finite ------------------------------------------------------


def test_every_float_key_is_covered() -> None:
    assert {"training.lr", "model.rope_theta", "metrics.peak_tflops"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused(
    key: str, value: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _user_error(capsys, ["train", f"--{key}={value}", f"--data.dir={tmp_path}"])
    assert f"{key} must be a finite number, got {value}" in err


def test_inf_learning_rate_in_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[training]\nlr = inf\n")
    with pytest.raises(ConfigError, match="training.lr must be a finite number, got inf"):
        load_config(path)


# --- 2. the world size is checked before the batch ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, world_size: int) -> None:
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


def test_layout_that_does_not_fit_the_launch_blames_the_world_size(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import torch.distributed as dist

    _torchrun_env(monkeypatch, 2)
    argv = ["train", "--parallel.dp_shard=3", f"--data.dir={tmp_path / 'none'}"]
    err = _user_error(capsys, [*argv, f"--job.run_dir={tmp_path / 'run'}"])
    assert "needs a world size of 3" in err and "the launch has 2 process" in err
    assert "dp_shard 3" in err and "--nproc_per_node=3" in err
    assert "global_batch_size" not in err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


def test_batch_is_still_checked_against_a_fitting_launch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _torchrun_env(monkeypatch, 3)
    err = _user_error(capsys, ["train", "--parallel.dp_shard=3", f"--data.dir={tmp_path}"])
    assert "training.global_batch_size (16) is not a multiple" in err


def test_without_a_launch_the_batch_is_checked_against_the_degrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"data-parallel degree \(3\)"):
        load_config(None, ["--parallel.dp_shard=3"])


# --- 3. distrib generate flags --------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "-0.5"),
        ("--max_new_tokens", "-1"),
        ("--top_k", "-3"),
    ],
)
def test_generate_refuses_bad_sampling_flags(
    flag: str,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import distrib.commands.generate as generate

    def no_checkpoint_read(*args: object) -> None:
        raise AssertionError("a checkpoint was read before the flags were checked")

    monkeypatch.setattr(generate, "load_run", no_checkpoint_read)
    err = _user_error(capsys, ["generate", "--run_dir", str(tmp_path), flag, value])
    assert flag in err and f"got {float(value) if flag == '--temperature' else value}" in err


def test_generate_accepts_the_edge_values() -> None:
    from distrib.commands.generate import check_sampling

    check_sampling(max_new_tokens=0, temperature=0.0, top_k=0)


# --- 4. progress output on and off a terminal -----------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _run_progress(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tty: bool, progress: bool = True
) -> _Stream:
    """Five steps through a logger whose stderr is (or is not) a terminal, as the trainer calls
    it: every step, with the figures of the last logged step."""
    stderr = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    log = MetricsLogger(MetricsConfig(log_every=2, progress=progress), tmp_path, True, 5, 0)
    log.progress(1, None, 1e-3, None)
    for step in range(2, 6):
        log.progress(step, 3.5, 1e-3, 1234.0)
    log.close()
    return stderr


def test_progress_off_a_terminal_prints_plain_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stderr = _run_progress(monkeypatch, tmp_path, tty=False)
    out = capsys.readouterr().out
    assert "\r" not in out and "\r" not in stderr.getvalue()
    assert out.splitlines() == [
        "step 2/5 | loss 3.5000 | lr 1.00e-03 | 1,234 tok/s",
        "step 4/5 | loss 3.5000 | lr 1.00e-03 | 1,234 tok/s",
        "step 5/5 | loss 3.5000 | lr 1.00e-03 | 1,234 tok/s",
    ]


def test_progress_on_a_terminal_draws_the_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stderr = _run_progress(monkeypatch, tmp_path, tty=True)
    assert capsys.readouterr().out == ""
    assert "\r" in stderr.getvalue() and "5/5" in stderr.getvalue()


def test_progress_false_prints_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stderr = _run_progress(monkeypatch, tmp_path, tty=False, progress=False)
    assert capsys.readouterr().out == "" and stderr.getvalue() == ""
