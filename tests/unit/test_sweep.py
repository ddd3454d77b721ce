"""`distrib sweep` without training: the sweep file and its errors, the shipped sweep files
against their configs, the configs trials get, how workers take trials (budget, abandoned
trials, distinct values per worker), the storages, and the Slurm batch script."""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path

import pytest

from distrib.cli import main
from distrib.commands.sweep_folder import new_setup, write_config
from distrib.commands.sweep_slurm import batch_script
from distrib.commands.sweep_space import check_keys, load_space
from distrib.commands.sweep_study import (
    STALE_S,
    Worker,
    abandoned,
    beat,
    has_study,
    open_study,
    take_trial,
    trial_dir,
)
from distrib.commands.sweep_trial import suggest
from distrib.config import load_config
from distrib.errors import ConfigError

ROOT = Path(__file__).parents[2]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.toml"))

SPACE = """
[sweep]
trials = 4
sampler = "random"
seed = 3
[overrides]
"training.steps" = 30
"training.min_lr" = 0.0
"metrics.progress" = false
[params]
"training.lr" = { type = "log_uniform", low = 1e-4, high = 1e-2 }
[params.training]
warmup_steps = { type = "int", low = 0, high = 20, step = 10 }
schedule = { type = "categorical", choices = ["cosine", "wsd"] }
"""


def _space(tmp_path: Path, text: str = SPACE, name: str = "space.toml") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweeps_fit_their_configs(path: Path) -> None:
    """configs/sweeps/NAME.toml searches configs/NAME.toml: every key and extreme is valid."""
    space = load_space(path)
    check_keys(space, ROOT / "configs" / path.name, space.overrides)


def test_a_space_reads_every_form(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path))
    assert space.trials == 4 and space.sampler == "random" and space.pruner == "none"
    assert [p.key for p in space.params] == [
        "training.lr",
        "training.warmup_steps",
        "training.schedule",
    ]
    assert space.params[1].grid() == [0, 10, 20]
    assert space.params[2].grid() == ["cosine", "wsd"]
    assert space.overrides == [
        "--training.steps=30",
        "--training.min_lr=0.0",
        "--metrics.progress=false",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sweep]\ntrials = 2\n[param]\n", "unknown table [param]: did you mean 'params'?"),
        ("[sweep]\ntrails = 2\n", "unknown key 'sweep.trails': did you mean 'trials'?"),
        ("[sweep]\nworkers = 2\n[params]\n", "sweep.trials (the number of trials) is required"),
        ("[sweep]\ntrials = 2\nsampler = 'tpe2'\n", "sweep.sampler = 'tpe2' is not valid"),
        ("[sweep]\ntrials = 0\n", "sweep.trials = 0: must be at least 1"),
        ("[sweep]\ntrials = 2\n", "[params] names no config key"),
        (
            "[sweep]\ntrials = 2\n[params]\n'training.lr' = { type = 'loguniform', low = 1, high = 2 }",
            "did you mean 'log_uniform'?",
        ),
        (
            "[sweep]\ntrials = 2\n[params]\n'training.lr' = { type = 'uniform', low = 2.0, high = 1.0 }",
            "low (2.0) must be below high (1.0)",
        ),
        (
            "[sweep]\ntrials = 2\n[params]\n'training.lr' = { type = 'log_uniform', low = 0.0, high = 1.0 }",
            "log_uniform needs low > 0",
        ),
        (
            "[sweep]\ntrials = 2\nsampler = 'grid'\n[params]\n'training.lr' = { type = 'uniform', low = 0.1, high = 1.0 }",
            "the grid sampler needs a `step` for uniform",
        ),
        (
            "[sweep]\ntrials = 2\n[pruner]\nmin_resource = 3\n[params]\n'training.lr' = { type = 'uniform', low = 0.1, high = 1.0 }",
            "pruner.min_resource is not an option of none",
        ),
        (
            "[sweep]\ntrials = 2\n[params]\n'training.lr' = { type = 'int', low = 1.5, high = 3 }",
            "expected int, got 1.5",
        ),
    ],
)
def test_a_bad_space_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert message in str(err.value)


def test_a_key_or_value_the_config_refuses_is_caught_before_any_trial(tmp_path: Path) -> None:
    bad_key = SPACE.replace('"training.lr"', '"training.learning_rate"')
    with pytest.raises(ConfigError, match=r"params.'training.learning_rate'.*did you mean"):
        check_keys(load_space(_space(tmp_path, bad_key)), None, [])
    space = load_space(_space(tmp_path))
    with pytest.raises(ConfigError, match=r"params.'training.lr' = 0.0001: .*min_lr"):
        check_keys(space, None, [])  # the default min_lr (3e-4) is above the range's low end
    check_keys(space, None, space.overrides)


def test_a_trial_config_trains_as_it_is(tmp_path: Path) -> None:
    """Written with the config's types, the overrides and the trial's values; loads as a
    training config with the run folder set."""
    base = tmp_path / "base.toml"
    base.write_text('[training]\nlr = 1e-3\nsteps = 50\n[data]\ndir = "data/x"\n')
    space = load_space(_space(tmp_path))
    setup = new_setup(tmp_path / "sweep", base, [*space.overrides, "--training.seed=7"], space)
    params = {"training.lr": 0.0025, "training.warmup_steps": 10, "training.schedule": "wsd"}
    path = write_config(tmp_path / "t.toml", setup, params, tmp_path / "run", "trial 0")
    raw = tomllib.loads(path.read_text())
    assert raw["training"]["lr"] == 0.0025 and raw["training"]["seed"] == 7
    assert raw["training"]["steps"] == 30 and raw["metrics"]["progress"] is False
    cfg = load_config(path)
    assert cfg.training.schedule == "wsd" and cfg.training.warmup_steps == 10
    assert cfg.data.dir == "data/x" and cfg.job.run_dir == str(tmp_path / "run")


def _study(tmp_path: Path, text: str = SPACE):
    space = load_space(_space(tmp_path, text))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir(exist_ok=True)
    return space, sweep_dir, open_study(space, sweep_dir)


def test_workers_take_distinct_trials_within_the_budget(tmp_path: Path) -> None:
    """Two workers (two study handles on one journal) alternate: four distinct trials with
    distinct values, then nothing; trial n's values do not depend on which worker asked."""
    space, sweep_dir, first = _study(tmp_path)
    second = open_study(space, sweep_dir)
    me = Worker.me()
    taken = []
    for study in (first, second, first, second):
        got = take_trial(study, space, sweep_dir, me)
        assert got is not None and not got.resumed
        taken.append((got.trial.number, tuple(suggest(got.trial, p) for p in space.params)))
        study.tell(got.trial, 1.0)
    assert [n for n, _ in taken] == [0, 1, 2, 3]
    assert len({values for _, values in taken}) == 4
    assert take_trial(first, space, sweep_dir, me) is None
    # The same sweep asked by one worker only: the same values, trial by trial.
    again, other_dir, solo = _study(tmp_path / "again")
    for number, values in taken:
        got = take_trial(solo, again, other_dir, me)
        assert got.trial.number == number
        assert tuple(suggest(got.trial, p) for p in again.params) == values
        solo.tell(got.trial, 1.0)


def test_an_abandoned_trial_is_finished_not_repeated(tmp_path: Path) -> None:
    space, sweep_dir, study = _study(tmp_path)
    me = Worker.me()
    running = take_trial(study, space, sweep_dir, me)
    suggest(running.trial, space.params[0])
    run_dir = trial_dir(sweep_dir, running.trial.number)
    assert not abandoned(run_dir)  # this process is its worker, and alive
    # Its worker was a process on this machine that is gone.
    beat(run_dir, Worker(me.host, pid=2**22 + 12345))
    assert abandoned(run_dir)
    # On another machine: abandoned once its heartbeat is older than STALE_S.
    beat(run_dir, Worker("elsewhere", pid=1))
    assert not abandoned(run_dir)
    old = time.time() - STALE_S - 1
    os.utime(run_dir / "heartbeat.json", (old, old))
    assert abandoned(run_dir)
    got = take_trial(study, space, sweep_dir, me)
    assert got.resumed and got.trial.number == running.trial.number
    assert got.trial.params == running.trial.params
    assert not abandoned(run_dir)  # taken: the heartbeat is this worker's now


def test_a_database_storage_holds_the_study(tmp_path: Path) -> None:
    text = SPACE.replace("[sweep]\n", f'[sweep]\nstorage = "sqlite:///{tmp_path}/study.db"\n')
    space, sweep_dir, study = _study(tmp_path, text)
    assert has_study(space, sweep_dir) and not (sweep_dir / "study.journal").exists()
    got = take_trial(study, space, sweep_dir, Worker.me())
    assert got is not None and got.trial.number == 0


def test_the_slurm_batch_script(tmp_path: Path) -> None:
    text = SPACE.replace("[sweep]\n", '[sweep]\nworkers = 3\nlauncher = "slurm"\n')
    text += '[slurm]\npartition = "gpu"\ngpus_per_node = 8\nextra = ["--account=ml"]\n'
    space = load_space(_space(tmp_path, text))
    script = batch_script(new_setup(tmp_path / "sw", None, [], space))
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --account=ml" in script
    assert "#SBATCH --signal=B:USR1@" in script
    assert f"-m distrib.cli sweep worker {tmp_path / 'sw'}" in script


def test_the_command_line_refuses_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--config", "missing.toml"]) == 2
    assert "needs --space FILE" in capsys.readouterr().err
    space = _space(tmp_path)
    assert main(["sweep", "--space", str(space), "--dir", "sw", "--training.lr"]) == 2
    assert "--training.lr needs a value" in capsys.readouterr().err
    assert main(["sweep", "--resume", "--dir", "nowhere"]) == 2
    assert "nowhere is not a sweep folder" in capsys.readouterr().err
    # The dataset is missing: refused, and nothing is left in the sweep folder.
    assert main(["sweep", "--space", str(space), "--dir", "sw", "--data.dir=nodata"]) == 2
    assert "nodata" in capsys.readouterr().err and not (tmp_path / "sw").exists()


def test_values_refused_together_fail_the_trial_not_the_worker(tmp_path: Path) -> None:
    """Each extreme passes alone, the pair does not: the trial fails with the reason and the
    worker goes on to the next."""
    from distrib.commands.sweep_trial import TrialRun

    text = SPACE.replace(
        '"training.lr" = { type = "log_uniform", low = 1e-4, high = 1e-2 }',
        '"training.micro_batch_size" = { type = "categorical", choices = [4] }\n'
        '"training.global_batch_size" = { type = "categorical", choices = [6] }',
    )
    space, sweep_dir, study = _study(tmp_path, text)
    setup = new_setup(sweep_dir, None, space.overrides, space)
    got = take_trial(study, space, sweep_dir, Worker.me())
    line = TrialRun(setup, study, got, Worker.me(), interrupted=lambda: False).run()
    assert "failed: its config is invalid" in line and "global_batch_size" in line
    (trial,) = study.get_trials()
    assert trial.state.name == "FAIL" and "global_batch_size" in trial.user_attrs["outcome"]


def test_the_metrics_tail_reads_whole_lines_as_the_file_grows(tmp_path: Path) -> None:
    from distrib.commands.sweep_trial import MetricsTail

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(tmp_path, "val_loss")
    assert tail.read() == {}
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "val_loss": 4.5}\n{"step": 3, "val')
    assert tail.read() == {2: 4.5}  # the unfinished line waits
    with open(path, "a") as f:
        f.write('_loss": 4.0}\n{"step": 2, "val_loss": 4.4}\n{"step": 4, "val_loss": NaN}\n')
    assert tail.read() == {2: 4.4, 3: 4.0}  # a replayed step replaces; NaN is no value


def test_a_sweep_searches_a_mixture_weight(tmp_path: Path) -> None:
    """Mixture weights are config keys too (`data.sources.<name>.weight`): checked against the
    config, and written into the source's entry of the trial's TOML."""
    text = SPACE.replace(
        '"training.lr" = { type = "log_uniform", low = 1e-4, high = 1e-2 }',
        '"data.sources.docs.weight" = { type = "uniform", low = 0.1, high = 0.5 }',
    )
    space = load_space(_space(tmp_path, text))
    config = ROOT / "configs" / "mixture_debug.toml"
    check_keys(space, config, space.overrides)
    setup = new_setup(tmp_path / "sweep", config, space.overrides, space)
    params = {
        "data.sources.docs.weight": 0.35,
        "training.warmup_steps": 0,
        "training.schedule": "wsd",
    }
    path = write_config(tmp_path / "t.toml", setup, params, tmp_path / "run", "trial 0")
    sources = tomllib.loads(path.read_text())["data"]["sources"]
    assert [(s["name"], s["weight"]) for s in sources] == [("code", 0.8), ("docs", 0.35)]
    assert load_config(path).data.sources[1]["weight"] == 0.35
