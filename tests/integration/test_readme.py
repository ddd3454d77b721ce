"""The README's quick start, run as written (shortened by overrides), so it never rots."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import ROOT, records

pytestmark = pytest.mark.slow


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's quick start has no bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands() -> None:
    assert quick_start_commands() == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_quick_start_trains_and_samples(tmp_path: Path) -> None:
    """The first command, in this environment, on a slice of the corpus and a few steps."""
    command = quick_start_commands()[0].split()
    overrides = [
        f"--data.dir={tmp_path / 'data'}",
        f"--job.run_dir={tmp_path / 'run'}",
        "--data.max_documents=150",
        "--training.steps=6",
        "--training.warmup_steps=2",
        "--training.eval_every=3",
        "--metrics.log_every=2",
        "--checkpoint.interval=3",
    ]
    env = {**os.environ, "VENV": sys.prefix}
    done = subprocess.run(
        [*command, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--- a sample from" in done.stdout
    sample = done.stdout.split("--- a sample from", 1)[1].split("\n", 1)[1]
    assert sample.startswith("def ")
    assert (tmp_path / "run" / "checkpoints" / "step-00000006").is_dir()
    assert len(records(tmp_path / "run")) == 4  # steps 2, 3, 4, 6
