"""Bad input on the command line: for each, exit code 2, one line naming the key, file or
value, no traceback, and nothing changed in the run folder or the dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distrib.cli import main
from tests.integration.conftest import TINY_RUN, train


@pytest.fixture(scope="module")
def used(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a finished 4-step run (checkpoint step-4)."""
    run = tmp_path_factory.mktemp("used") / "run"
    assert train(data_dir, run, "--training.steps=4") == 0
    return run


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    # The lock file names its holder of the moment; everything else must stay as it was.
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# (argv after the command, text the message must hold); {data}, {run}, {tmp} are filled in.
TRAIN = [
    (["--training.lr=inf"], "training.lr"),
    (["--training.lr=nan"], "training.lr"),
    (["--model.rope_theta=-inf"], "model.rope_theta"),
    (["--training.steps=-1"], "training.steps"),
    (["--model.attention=flashy"], "model.attention"),
    (["--nosuch.key=1"], "nosuch"),
    (["--training.lr=fast"], "training.lr"),
    (["--config={tmp}/missing.toml"], "missing.toml"),
    (["--data.dir={tmp}/no-data"], "no-data"),
    (["--model.vocab_size=100"], "model.vocab_size"),
    (["--checkpoint.keep=-1"], "checkpoint.keep"),
    (["--checkpoint.resume={tmp}/nowhere"], "nowhere"),
    (["--checkpoint.resume=never"], "job.overwrite"),
    (["--job.overwrite=true"], "job.overwrite"),
    (["--model.ffn_dim=96"], "[96, 32]"),
    (["--model.n_layers=2"], "model.n_layers"),
    (["--job.run_dir={tmp}/a-file"], "a-file"),
    (["--job.run_dir={tmp}/a-file/below"], "a-file/below"),
    (["--training.global_batch_size=7"], "training.global_batch_size"),
    # Fault tolerance without the environment launch/train.sh gives each replica group.
    (["--parallel.fault_tolerance=true", "--parallel.dp_replicate=2"], "$DISTRIB_REPLICA_GROUP"),
    (["--training.sync=diloco"], "parallel.fault_tolerance = true"),
]

OTHER = [
    (["generate", "--run_dir={tmp}/nowhere"], "nowhere"),
    (["generate", "--run_dir={run}", "--temperature=nan"], "--temperature"),
    (["generate", "--run_dir={run}", "--max_new_tokens=-1"], "--max_new_tokens"),
    (["generate", "--run_dir={run}", "--top_k=-5"], "--top_k"),
    (["generate", "--run_dir={run}", "--step=99"], "step 99"),
    (["export", "--run_dir={run}", "--format=onnx", "{tmp}/out"], "onnx"),
    (["export", "--run_dir={run}", "{run}"], "not empty"),
    (["export", "--run_dir={run}", "--step=3", "{tmp}/out"], "step 3"),
    (["report", "{tmp}/nowhere"], "nowhere"),
    (["prepare", "--data.source={tmp}/no-corpus.txt"], "no-corpus.txt"),
]


def _fill(argv: list[str], data: Path, run: Path, tmp: Path) -> list[str]:
    return [a.format(data=data, run=run, tmp=tmp) for a in argv]


@pytest.mark.parametrize(
    ("argv", "named"), TRAIN + OTHER, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], named: str, data_dir: Path, used: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "a-file").write_text("not a folder\n")
    data = tmp_path / "data"  # a copy: `prepare` may only touch this one
    shutil.copytree(data_dir, data)
    before = (_snapshot(used), _snapshot(data))
    if (argv, named) in TRAIN:
        argv = ["train", f"--data.dir={data}", f"--job.run_dir={used}", *TINY_RUN, *argv]
    elif argv[0] == "prepare":
        argv = [*argv, f"--data.dir={data}"]
    argv = _fill(argv, data, used, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distrib {argv[0]}: error: "), err
    assert named.format(tmp=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert (_snapshot(used), _snapshot(data)) == before
    assert not (tmp_path / "out").exists()


def test_world_size_is_blamed_before_the_batch(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """torchrun with 2 processes and dp_shard = 3: the world size is wrong, not the batch."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    assert train(data_dir, tmp_path / "run", "--parallel.dp_shard=3") == 2
    err = capsys.readouterr().err
    assert "world size of 3" in err and "2 process" in err and "batch" not in err
    assert not (tmp_path / "run").exists()
