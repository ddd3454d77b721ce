"""`distrib train | prepare | generate | export | report | sweep`: parse, call, tear down. No logic
here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distrib.config import Config, ModelConfig, help_lines, load_config
from distrib.errors import UserError

# Whether this `distrib train` was started as one of several processes (see `_finish`).
_launched = False

_CONFIG_HELP = "TOML config (default: the built-in debug model); then --section.key=value overrides"


def _config_parser(name: str, sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="config keys:\n" + "\n".join(help_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help=_CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distrib", description="Train Llama-style language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _config_parser("train", sub, "train a model (resumes from the newest checkpoint by default)")
    _config_parser("prepare", sub, "tokenize a corpus into shards (default: the Python stdlib)")
    prep = sub.choices["prepare"].add_mutually_exclusive_group()
    prep.add_argument(
        "--force", action="store_true", help="rebuild even if a matching dataset exists"
    )
    prep.add_argument(
        "--verify",
        action="store_true",
        help="check the full sha256 of every shard of data.dir (reads it all); changes nothing",
    )
    split = sub.choices["prepare"]
    split.add_argument(
        "--task",
        type=int,
        default=None,
        help="tokenize only this share of the corpus (0 <= TASK < TASKS; e.g. $SLURM_ARRAY_TASK_ID); "
        "a later distrib prepare without it merges the shares",
    )
    split.add_argument("--tasks", type=int, default=None, help="how many shares (--task)")
    split.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="train (or load) and save the tokenizer the --task runs share, then stop",
    )
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--run_dir", type=Path, required=True, help="the run folder (job.run_dir)")
    gen.add_argument("--prompt", default="def ", help="text to continue")
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest (0: all)")
    gen.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user turn, rendered in the run's chat template (fine-tuned runs)",
    )
    exp = sub.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face folder (transformers loads it), or a "
        "LoRA run's adapters as a peft adapter folder",
    )
    exp.add_argument("--run_dir", type=Path, required=True, help="the run folder (job.run_dir)")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    exp.add_argument(
        "--format",
        default="hf",
        # Checked by export_run, not argparse: a bad value is then one line and exit 2.
        help="hf (default) or peft. hf: safetensors + config + tokenizer (a LoRA run: adapters merged); peft: a LoRA "
        "run's adapters for peft.PeftModel.from_pretrained on its base",
    )
    exp.add_argument(
        "--max_shard_size", default="5GB", help="split the weights into files of at most this"
    )
    exp.add_argument("out", type=Path, metavar="OUT", help="new (or empty) output folder")
    rep = sub.add_parser(
        "report", help="charts (PNG) and a summary table (Markdown) of one or more runs"
    )
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders")
    rep.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <first RUN_DIR>/report)"
    )
    _sweep_parser(sub)
    _plan_parser(sub)
    _tune_parser(sub)
    return parser


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser(
        "plan",
        help="predict per-GPU memory and speed of every layout of a config on N GPUs; rank "
        "those that fit",
        description="distrib plan --config C --gpus N [--gpu h100] [--section.key=value ...]. "
        "See docs/planning.md.",
    )
    pl.add_argument("--config", type=Path, default=None, help=_CONFIG_HELP)
    pl.add_argument("--gpus", type=int, required=True, help="how many GPUs in all")
    pl.add_argument("--gpu", default="h100", help="device key in the devices file (default h100)")
    pl.add_argument("--gpu-memory", type=float, default=0.0, help="GB per GPU, if not the device's")
    pl.add_argument("--nodes", type=int, default=0, help="nodes the GPUs are spread over")
    pl.add_argument(
        "--gpus-per-node", type=int, default=0, help="GPUs per node (default: the device's)"
    )
    pl.add_argument("--devices", type=Path, default=None, help="a TOML of more devices")
    pl.add_argument("--top", type=int, default=15, help="how many layouts to list")
    pl.add_argument("--explain", default=None, metavar="LAYOUT", help="one layout's arithmetic")


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    tu = sub.add_parser(
        "tune",
        help="run the planner's best layouts for a few steps here; write the fastest as a "
        "config and the measured efficiency as a devices file",
        description="distrib tune --config C --nproc N [--section.key=value ...]. See "
        "docs/planning.md.",
    )
    tu.add_argument("--config", type=Path, default=None, help=_CONFIG_HELP)
    tu.add_argument("--nproc", type=int, required=True, help="processes (GPUs) on this node")
    tu.add_argument("--gpu", default=None, help="device key (default: this machine's)")
    tu.add_argument("--devices", type=Path, default=None, help="a TOML of more devices")
    tu.add_argument("--top", type=int, default=3, help="how many layouts to run")
    tu.add_argument("--steps", type=int, default=20, help="training steps per layout")
    tu.add_argument("--dir", type=Path, default=Path("tune"), help="output folder")


def cmd_tune(args: argparse.Namespace, cfg: Config, rest: list[str]) -> None:
    from distrib.commands.tune import TuneSetup, run_tune

    config = args.config.resolve() if args.config else None
    print(
        run_tune(
            cfg,
            TuneSetup(config, rest),
            args.nproc,
            args.dir,
            args.gpu,
            args.devices,
            args.top,
            args.steps,
        )
    )


def cmd_plan(args: argparse.Namespace, cfg: Config) -> None:
    from distrib.commands.plan import run_plan

    print(
        run_plan(
            cfg,
            args.gpus,
            args.gpu,
            args.gpu_memory,
            args.nodes,
            args.gpus_per_node,
            args.devices,
            args.top,
            args.explain,
        )
    )


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser(
        "sweep",
        help="hyper-parameter search: trials are training runs (Optuna; local or Slurm workers)",
        description="distrib sweep --config C --space S.toml [--section.key=value ...]: run a "
        "sweep; distrib sweep --resume --dir D: continue one; distrib sweep report D: its "
        "charts, table and best config. See docs/sweeps.md.",
    )
    sw.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "report", "worker"],
        help="run (default); report DIR; worker DIR (started by the sweep itself)",
    )
    sw.add_argument("target", nargs="?", type=Path, default=None, help="the sweep folder")
    sw.add_argument("--config", type=Path, default=None, help=_CONFIG_HELP)
    sw.add_argument("--space", type=Path, default=None, help="the sweep file (TOML)")
    sw.add_argument(
        "--dir", type=Path, default=None, help="the sweep folder (default: [sweep] dir)"
    )
    sw.add_argument(
        "--resume", action="store_true", help="continue the sweep in --dir (or the --space's)"
    )
    sw.add_argument("--out", type=Path, default=None, help="report: output folder")


def cmd_sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from distrib.commands import sweep

    if args.action in ("report", "worker"):
        folder = args.target or args.dir
        if folder is None or rest:
            raise UserError(f"usage: distrib sweep {args.action} DIR")
        if args.action == "worker":
            return sweep.run_worker(folder)
        from distrib.commands.sweep_report import write_sweep_report

        paths = write_sweep_report(folder, args.out)
        print(paths[0].read_text(encoding="utf-8"), end="")
        print(f"wrote {len(paths)} files to {paths[0].parent}")
        return 0
    from distrib.config import parse_overrides

    parse_overrides(rest)  # malformed overrides fail here, before anything is written
    if args.resume and rest:
        raise UserError("distrib sweep --resume takes no overrides: the sweep keeps its own")
    setup = sweep.prepare_sweep(args.config, args.space, rest, args.dir, args.resume)
    return sweep.run_sweep(setup)


def cmd_train(cfg: Config) -> None:
    from distrib.runtime import detect_launch, init_runtime, shutdown
    from distrib.train.trainer import Trainer, check_dataset

    # Everything that can be checked without a process group is checked first; the layout
    # against the launch before the rest, since a wrong world size shows up as other errors.
    global _launched
    launch = detect_launch()
    _launched = launch.distributed
    if cfg.parallel.fault_tolerance:
        from distrib.config.replica_rules import replica_group_config
        from distrib.parallel.replicas import replica_group_index, replica_group_run

        # This launch is one replica group: its layout, in its own folder of the run.
        cfg = replica_group_run(cfg, replica_group_index(cfg))
        if not launch.distributed:
            raise UserError(
                "parallel.fault_tolerance = true: start each replica group under a launcher "
                "(torchrun, srun, mpirun), whose store its torchft manager shares; "
                "launch/train.sh does it for every group"
            )
        _check_layout(replica_group_config(cfg), launch.world_size)
    else:
        _check_layout(cfg, launch.world_size)
    report = (lambda line: print(f"distrib: {line}", flush=True)) if launch.rank == 0 else None
    shards = check_dataset(cfg.data, cfg.model, report)
    runtime = init_runtime(launch=launch)
    try:
        Trainer(cfg, runtime, shards).train()
        # Every rank finishes its in-flight collectives before the group is torn down.
        runtime.barrier()
    finally:
        shutdown()


def _check_layout(cfg: Config, world_size: int) -> None:
    from distrib.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    dims.check_batch(cfg.training, cfg.parallel)
    if cfg.parallel.engine == "deepspeed":
        # The override JSON is merged and checked here, before any process group starts.
        from distrib.engines.deepspeed.config import effective_config

        effective_config(cfg, dims.dp)


def cmd_prepare(
    cfg: Config,
    force: bool,
    verify: bool,
    task: tuple[int, int] | None = None,
    tokenizer_only: bool = False,
) -> None:
    from distrib.data.prepare import prepare_dataset
    from distrib.data.verify import verify_dataset

    if verify:
        if cfg.data.sources:
            from distrib.data.mixture import verify_mixture

            verify_mixture(cfg.data)
        else:
            verify_dataset(cfg.data.dir)
        return
    prepare_dataset(
        cfg.data,
        cfg.model.vocab_size,
        cfg.training.seed,
        force=force,
        task=task,
        tokenizer_only=tokenizer_only,
    )


def _task(args: argparse.Namespace, cfg: Config) -> tuple[int, int] | None:
    """--task I --tasks N, checked; None without them."""
    if args.task is None and args.tasks is None:
        return None
    if args.task is None or args.tasks is None or not 0 <= args.task < args.tasks:
        raise UserError(
            f"--task {args.task} --tasks {args.tasks}: give both, with 0 <= TASK < TASKS"
        )
    if cfg.data.sources or cfg.data.format != "text":
        raise UserError("--task splits a text corpus; mixtures and chat data are prepared whole")
    if args.verify or args.tokenizer_only:
        raise UserError("--task does not go with --verify or --tokenizer-only")
    return args.task, args.tasks


def cmd_generate(args: argparse.Namespace) -> None:
    from distrib.commands.generate import generate_text

    text = generate_text(
        args.run_dir,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.step,
        args.seed,
        chat=args.chat,
    )
    print(text)


def cmd_export(args: argparse.Namespace) -> None:
    from distrib.commands.export import export_run

    out = export_run(args.run_dir, args.out, args.format, args.step, args.max_shard_size)
    print(f"wrote {out}")


def cmd_report(args: argparse.Namespace) -> None:
    from distrib.commands.report import write_report

    out = args.out if args.out is not None else args.run_dirs[0] / "report"
    paths = write_report(args.run_dirs, out)
    print(paths[-1].read_text(encoding="utf-8"), end="")
    print(f"wrote {len(paths)} files to {out}")


def _from_init_folder(model: ModelConfig, explicit: set[str]) -> ModelConfig:
    # model.init_from = "hf:PATH" or "run:DIR" takes the source's shape and family for every
    # model key the user did not set (imported here: transformers and torch are slow to import).
    if model.init_from.startswith("run:"):
        from distrib.checkpoint.init_from import run_model_config

        return run_model_config(model, explicit)
    from distrib.models.hf import init_from_model_config

    return init_from_model_config(model, explicit)


def _init_tokenizer(cfg: Config) -> Config:
    """Fine-tuning data must be tokenized as the starting model was: with `model.init_from`
    set and `data.tokenizer` empty, the source's tokenizer is the one used."""
    source = cfg.model.init_from
    if cfg.data.tokenizer or not source:
        return cfg
    if source.startswith("run:"):
        from distrib.checkpoint.init_from import run_tokenizer

        cfg.data.tokenizer = str(run_tokenizer(source))
    else:
        cfg.data.tokenizer = source.removeprefix("hf:")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distrib` console script; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "sweep":
            return cmd_sweep(args, rest)
        if args.command in ("generate", "export", "report"):
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            if args.command == "generate":
                cmd_generate(args)
            elif args.command == "export":
                cmd_export(args)
            else:
                cmd_report(args)
            return 0
        cfg = _init_tokenizer(load_config(args.config, rest, resolve_model=_from_init_folder))
        if args.command == "train":
            cmd_train(cfg)
        elif args.command == "plan":
            cmd_plan(args, cfg)
        elif args.command == "tune":
            cmd_tune(args, cfg, rest)
        else:
            cmd_prepare(cfg, args.force, args.verify, _task(args, cfg), args.tokenizer_only)
    except UserError as err:
        print(f"distrib {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it
        print(f"distrib {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def console(argv: list[str] | None = None) -> None:
    """The `distrib` console script and `python -m distrib.cli`: `main`, then exit the process.

    A launched training process leaves at once after its teardown: left to the interpreter's
    own shutdown, a worker sometimes aborts after a finished run ("terminate called without an
    active exception": a C++ thread of gloo or DCP still alive while Python exits), and the
    launcher then reports a failed job. Every file is written and closed, and the process group
    destroyed, before this point. `main` itself never exits, so it can be called in-process.
    """
    global _launched
    _launched = False
    code = main(argv)
    if _launched:
        if "mpi4py.MPI" in sys.modules:  # mpirun expects every rank to finalize MPI
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
