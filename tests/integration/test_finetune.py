"""Post-training through the command line, in one process: a tiny pretrained run, then SFT
from it (`model.init_from = "run:DIR"`) on the standard library's instruction pairs, then DPO
from the SFT run on the preference pairs, whose reward accuracy must rise.

Each stage starts from the previous run's checkpoint with the model keys and the tokenizer taken
from it, as a user's fine-tuning config would (no shape keys given)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distrib.checkpoint.init_from import load_run_weights, parse_run_source, run_model_config
from distrib.checkpoint.run import load_run
from distrib.cli import main
from distrib.config import ConfigError, ModelConfig
from distrib.models.build import build_model
from tests.integration.conftest import TINY_RUN
from tests.support.runs import records

pytestmark = pytest.mark.slow

# The fine-tuning runs: longer sequences than pretraining (the RoPE tables are computed, not
# loaded), few steps, every step logged. No model keys: they come from the source run.
FINETUNE = [
    "--model.max_seq_len=256",
    "--data.seq_len=256",
    "--data.max_documents=400",
    "--data.val_fraction=0.2",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=4",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=0",
]


@pytest.fixture(scope="module")
def base_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("base") / "run"
    args = ["train", f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *TINY_RUN]
    assert main([*args, "--training.lr=1e-2"]) == 0
    return run_dir


def test_run_source_gives_the_shape_the_tokenizer_and_the_weights(base_run: Path) -> None:
    assert parse_run_source(f"run:{base_run}@8") == (base_run, 8)
    with pytest.raises(ConfigError, match="step number"):
        parse_run_source(f"run:{base_run}@last")
    resolved = run_model_config(ModelConfig(init_from=f"run:{base_run}"), set())
    saved = json.loads((base_run / "config.json").read_text())["model"]
    assert (resolved.dim, resolved.n_layers, resolved.vocab_size) == (
        saved["dim"],
        saved["n_layers"],
        saved["vocab_size"],
    )
    with pytest.raises(ConfigError, match="contradicts model.init_from"):
        run_model_config(ModelConfig(init_from=f"run:{base_run}", dim=48), {"dim"})
    # The weights land in a freshly initialized model, equal to the checkpoint's.
    model = build_model(resolved, torch.device("cpu"), seed=99)
    load_run_weights([model], f"run:{base_run}")
    want, _, _ = load_run(base_run, None, torch.device("cpu"))
    for (name, got), (_, expected) in zip(
        model.state_dict().items(), want.state_dict().items(), strict=True
    ):
        assert torch.equal(got, expected), name


def _prepare(out: Path, source_run: Path, fmt: str, *more: str) -> None:
    objective = {"chat": "sft", "preference": "dpo"}[fmt]
    args = ["prepare", f"--data.dir={out}", f"--data.format={fmt}"]
    args += [f"--training.objective={objective}", f"--model.init_from=run:{source_run}"]
    assert main([*args, *FINETUNE, *more]) == 0


@pytest.fixture(scope="module")
def sft_run(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    _prepare(root / "data", base_run, "chat")
    run_dir = root / "run"
    args = [
        "train",
        f"--data.dir={root / 'data'}",
        "--data.format=chat",
        "--training.objective=sft",
        f"--model.init_from=run:{base_run}",
        f"--job.run_dir={run_dir}",
        "--training.steps=6",
        "--training.lr=3e-3",
        *FINETUNE,
    ]
    assert main(args) == 0
    return run_dir


def test_sft_trains_on_the_assistant_tokens_of_the_source_run(
    sft_run: Path, base_run: Path
) -> None:
    logged = records(sft_run)
    assert [r["step"] for r in logged] == list(range(1, 7))
    # Only the responses count: fewer targets than the 8 x 256 tokens of a step, never none.
    assert all(0 < r["target_tokens"] < 8 * 256 for r in logged)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    config = json.loads((sft_run / "config.json").read_text())
    base = json.loads((base_run / "config.json").read_text())
    assert config["model"]["dim"] == base["model"]["dim"]
    assert config["data"]["tokenizer"] == str(base_run / "tokenizer.json")


@pytest.fixture(scope="module")
def pref_data(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "data"
    _prepare(out, sft_run, "preference")
    return out


def _dpo_args(data: Path, sft_run: Path, run_dir: Path) -> list[str]:
    return [
        "train",
        f"--data.dir={data}",
        "--data.format=preference",
        "--training.objective=dpo",
        f"--model.init_from=run:{sft_run}",
        f"--job.run_dir={run_dir}",
        "--training.lr=1e-3",
        "--training.schedule=constant",
        "--training.weight_decay=0",
        "--dpo.beta=0.1",
        *FINETUNE,
    ]


def test_dpo_from_the_sft_run_raises_preference_accuracy(
    sft_run: Path, pref_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    args = _dpo_args(pref_data, sft_run, run_dir)
    # Two epochs. A pair's rejected body is another function's real body, chosen in its own
    # pair, so a model this small does not generalize to unseen pairs: the rise is measured on
    # the second pass over the same pairs (in another order), against the first.
    manifest = json.loads((pref_data / "manifest.json").read_text())
    epoch = manifest["examples"]["train"]["num_examples"] // 8  # global batches of 8 pairs
    assert epoch >= 10
    assert main([*args, f"--training.steps={2 * epoch}"]) == 0
    logged = records(run_dir)
    first, last = logged[:epoch], logged[epoch:]
    for r in logged:
        assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(r)
    # At step 1 the policy is the reference: every reward is zero, the loss is log 2.
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert abs(logged[0]["reward_margin"]) < 1e-4
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward_accuracy") > mean(first, "reward_accuracy")
    assert mean(last, "reward_margin") > mean(first, "reward_margin")
    assert (run_dir / "reference_logps.npz").is_file()
    # A resumed run reads the reference back: the starting weights are no longer in memory.
    capsys.readouterr()
    assert main([*args, f"--training.steps={2 * epoch + 1}"]) == 0
    out = capsys.readouterr().out
    assert "reference log-probabilities read from" in out and "resumed from" in out


def test_dpo_with_lora_starts_from_the_base_and_saves_adapters_only(
    sft_run: Path, pref_data: Path, tmp_path: Path
) -> None:
    """With LoRA the reference is the base without adapters: at step 1 (adapters' B at zero)
    the policy equals it, so the loss is log 2; checkpoints hold the adapters only."""
    run_dir = tmp_path / "run"
    lora = ["--lora.rank=4", "--lora.targets=all", "--training.steps=3", "--checkpoint.interval=3"]
    assert main([*_dpo_args(pref_data, sft_run, run_dir), *lora]) == 0
    logged = records(run_dir)
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert logged[-1]["reward_margin"] != 0.0  # the adapters moved the policy
    step = run_dir / "checkpoints" / "step-00000003"
    names = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    weights = [k for k in names if k.startswith("model.")]
    assert weights and all(k.endswith((".lora_a", ".lora_b")) for k in weights), weights


def test_the_chat_template_travels_to_generate_and_export(
    sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The SFT run keeps the template its data was rendered with: `generate --chat` wraps the
    prompt in it, and the exported tokenizer carries it for `apply_chat_template`."""
    from transformers import AutoTokenizer

    assert (sft_run / "chat_template.jinja").is_file()
    capsys.readouterr()
    args = ["generate", f"--run_dir={sft_run}", "--prompt=def f():", "--max_new_tokens=4"]
    assert main([*args, "--chat", "--temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("<|user|>\ndef f():\n<|assistant|>\n")
    assert main(["export", f"--run_dir={sft_run}", str(tmp_path / "hf")]) == 0
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == f"<|user|>\nhi\n<|assistant|>\nyo{hf.eos_token}"


def test_generate_chat_needs_a_fine_tuned_run(
    base_run: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["generate", f"--run_dir={base_run}", "--chat", "--max_new_tokens=1"]) == 2
    assert "no chat_template.jinja" in capsys.readouterr().err


def test_context_extension_from_the_run_under_cp(
    base_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    """configs/long_context_debug.toml's recipe on the tiny run: 4x longer sequences, RoPE
    scaled anew (llama3 over the 64 positions it was trained on), each sequence split over two
    ranks; the weights and the other model keys come from the run."""
    from tests.support.runs import run_train

    rope = {"rope_scaling": "llama3", "rope_factor": 4.0, "rope_original_max_seq_len": 64}
    source = f"run:{base_run}"
    # Set explicitly, the RoPE keys are ours; left out, the run's (no scaling).
    ours = run_model_config(ModelConfig(init_from=source, **rope), set(rope))
    assert (ours.rope_scaling, ours.rope_factor, ours.rope_original_max_seq_len) == (
        "llama3",
        4.0,
        64,
    )
    assert run_model_config(ModelConfig(init_from=source, **rope), set()).rope_scaling == "none"
    flags = [f"--model.{key}={value}" for key, value in rope.items()]
    run_train(
        2,
        [
            f"--model.init_from={source}",
            f"--data.dir={data_dir}",
            f"--job.run_dir={tmp_path}",
            *flags,
            "--parallel.cp=2",
            "--training.steps=2",
            *[f for f in FINETUNE if "max_documents" not in f and "val_fraction" not in f],
        ],
    )
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    base = json.loads((base_run / "config.json").read_text())["model"]
    assert {key: saved[key] for key in rope} == rope
    assert (saved["dim"], saved["n_layers"], saved["max_seq_len"]) == (base["dim"], 4, 256)
    # Trained weights, not a fresh init: the first loss is below the base run's first.
    base_first = records(base_run)[0]["loss"]
    assert records(tmp_path)[0]["loss"] < base_first - 0.5
