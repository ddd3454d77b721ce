"""Weights across the boundary of a run: export a checkpoint as a Hugging Face folder, and place
full (unsharded) tensors from outside into a parallelized model.

`distrib export --format hf` writes what `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load: config.json (the class `model.family` names),
generation_config.json, safetensors weights (sharded with an index above `max_shard_size`) and
the run's tokenizer.

The weights are written in the on-disk layout that `save_pretrained` writes and both
transformers 4.x and 5.x read (MoE experts one tensor each; 5.x fuses them only in memory), by
huggingface_hub's `save_torch_state_dict`, the writer `save_pretrained` itself calls; going
through an in-memory HF model instead would tie the export to one transformers version's layout.
config.json also carries the keys 4.x reads that 5.x no longer writes (`legacy_config_keys`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from distrib.checkpoint.run import load_run
from distrib.data.tokenizer import TOKENIZER_FILE, Tokenizer
from distrib.errors import ExportError
from distrib.models.hf import CONFIG_FILE
from distrib.models.hf_families import hf_config, legacy_config_keys, to_hf_state_dict
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


def _check_expert_bias(model: Transformer) -> None:
    # No HF family routes with a bias: exporting a trained one would change which experts run.
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias") and bool(buffer.ne(0).any()):
            raise ExportError(
                f"{name} is not zero (auxiliary-loss-free balancing, model.moe_bias_update_rate "
                f"> 0): {model.cfg.family} has no routing bias, so the exported model would "
                "route differently"
            )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under the on-disk HF names, each with storage of its own (the
    per-expert slices of a stack are copied: the writer refuses tensors sharing storage), the
    tied head left out (the config's tie_word_embeddings restores it)."""
    state = to_hf_state_dict(model.state_dict(), model.cfg)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: t.detach().clone() if t._is_view() else t.detach() for name, t in state.items()}


def save_hf(model: Transformer, tokenizer_file: Path, out: Path, max_shard_size: str | int) -> None:
    """Write `model` (full, on one process) and its tokenizer as an HF folder `out`."""
    import transformers
    from huggingface_hub import save_torch_state_dict

    _check_expert_bias(model)
    tokenizer = hf_tokenizer(tokenizer_file, model.cfg.max_seq_len)
    eos_id = tokenizer.eos_token_id
    config = hf_config(model.cfg, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    state = hf_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config.save_pretrained(out)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    _add_config_keys(out / CONFIG_FILE, {**legacy_config_keys(model.cfg), "torch_dtype": dtype})
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _add_config_keys(path: Path, keys: dict[str, Any]) -> None:
    """Add `keys` that config.json lacks (never overwriting what transformers wrote)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update({k: v for k, v in keys.items() if k not in data})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
