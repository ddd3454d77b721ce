"""Weights across the boundary of a run: export a checkpoint as a Hugging Face folder, and place
full (unsharded) tensors from outside into a parallelized model.

`distrib export --format hf` writes what `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load: config.json, generation_config.json, safetensors weights
(sharded with an index above `max_shard_size`) and the run's tokenizer. The writing is done by
transformers' own `save_pretrained`, so the folder is exactly what it expects to read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from distrib.checkpoint.run import load_run
from distrib.data.tokenizer import TOKENIZER_FILE, Tokenizer
from distrib.errors import ExportError
from distrib.models.hf import hf_config, to_hf_state_dict
from distrib.models.transformer import Transformer

FORMATS = ("hf",)
DEFAULT_MAX_SHARD_SIZE = "5GB"


def hf_tokenizer(tokenizer_file: Path, max_seq_len: int) -> Any:
    """Our tokenizer.json as a `transformers.PreTrainedTokenizerFast`.

    Training separates documents with the EOS and adds no BOS, so the EOS is also the BOS (as in
    GPT-2) and the padding token; the tokenizer adds no special tokens of its own.
    """
    import transformers

    eos = Tokenizer.load(tokenizer_file).eos_token
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        model_max_length=max_seq_len,
    )


def save_hf(model: Transformer, tokenizer_file: Path, out: Path, max_shard_size: str | int) -> None:
    """Write `model` (full, on one process) and its tokenizer as an HF folder `out`."""
    import transformers

    tokenizer = hf_tokenizer(tokenizer_file, model.cfg.max_seq_len)
    eos_id = tokenizer.eos_token_id
    config = hf_config(model.cfg, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    # Built on meta and given our tensors (assign=True): no second copy, no random init.
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    state = to_hf_state_dict(model.state_dict())
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; tie_weights restores it
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    if unexpected or set(missing) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set()):
        raise RuntimeError(f"HF conversion: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output folder {out} exists and is not empty: choose a new path")


def export_run(
    run_dir: Path,
    out: Path,
    fmt: str = "hf",
    step: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Export the newest (or `step`'s) checkpoint of `run_dir` as `fmt` into `out`.

    The folder is written under a `.partial` name and renamed into place once complete, so a
    failed export never leaves an `out` that looks usable.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' for {out}: choose one of {FORMATS}")
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    model, _, _ = load_run(run_dir, step, torch.device("cpu"))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier failed export
    save_hf(model, run_dir / TOKENIZER_FILE, partial, max_shard_size)
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return out
