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

A LoRA run (`lora.rank > 0`) exports either way: `--format hf` writes the base with the adapters
merged into its weights, a model like any other; `--format peft` writes only the adapters as a
peft adapter folder (adapter_config.json, adapter_model.safetensors under peft's names), which
`peft.PeftModel.from_pretrained(base, folder)` puts on the HF base model the run started from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib.checkpoint.run import load_run
from distrib.config import Config
from distrib.data.chat import TEMPLATE_FILE
from distrib.data.tokenizer import TOKENIZER_FILE, Tokenizer
from distrib.errors import ExportError
from distrib.models.hf import CONFIG_FILE
from distrib.models.hf_families import hf_config, legacy_config_keys, to_hf_name, to_hf_state_dict
from distrib.models.lora import adapter_modules, merge_lora
from distrib.models.transformer import Transformer

FORMATS = ("hf", "peft")
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"


def hf_tokenizer(tokenizer_file: Path, max_seq_len: int) -> Any:
    """Our tokenizer.json as a `transformers.PreTrainedTokenizerFast`.

    Training separates documents with the EOS and adds no BOS, so the EOS is also the BOS (as in
    GPT-2) and the padding token; the tokenizer adds no special tokens of its own. A run that
    fine-tuned on chat data keeps the template it was trained with beside its tokenizer
    (`chat_template.jinja`); the tokenizer carries it, so `apply_chat_template` on the exported
    model renders conversations as training did.
    """
    import transformers

    eos = Tokenizer.load(tokenizer_file).eos_token
    template = tokenizer_file.parent / TEMPLATE_FILE
    extra = {"chat_template": template.read_text(encoding="utf-8")} if template.is_file() else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        model_max_length=max_seq_len,
        **extra,
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


def _peft_module(name: str) -> str:
    """peft's name of the layer our module `name` is (layers.0.attention.wq ->
    base_model.model.model.layers.0.self_attn.q_proj), the HF model wrapped as peft wraps it."""
    return "base_model.model." + to_hf_name(f"{name}.weight").removesuffix(".weight")


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of `model` (whole, one process) under the names peft saves them with."""
    state: dict[str, torch.Tensor] = {}
    for name, module in adapter_modules(model).items():
        state[f"{_peft_module(name)}.lora_A.weight"] = module.lora_a.detach().contiguous()
        state[f"{_peft_module(name)}.lora_B.weight"] = module.lora_b.detach().contiguous()
    return state


def save_peft(model: nn.Module, cfg: Config, out: Path) -> None:
    """Write the adapters of `model` (a LoRA run's, config `cfg`) as a peft adapter folder."""
    import peft
    from safetensors.torch import save_file

    targets = sorted({_peft_module(name).rpartition(".")[2] for name in adapter_modules(model)})
    source = cfg.model.init_from
    base = (
        str(Path(source.removeprefix("hf:")).expanduser().resolve())
        if source.startswith("hf:")
        else None
    )
    config = peft.LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(peft_state_dict(model), str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


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
    model, _, cfg = load_run(run_dir, step, torch.device("cpu"))
    lora = cfg.lora.rank > 0
    if fmt == "peft" and not lora:
        raise ExportError(
            f"--format peft writes LoRA adapters, but {run_dir} trained every weight "
            "(lora.rank = 0): use --format hf"
        )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier failed export
    if fmt == "peft":
        save_peft(model, cfg, partial)
    else:  # a LoRA run's adapters folded into the base weights
        merged = merge_lora(model) if lora else model
        assert isinstance(merged, Transformer)
        save_hf(merged, run_dir / TOKENIZER_FILE, partial, max_shard_size)
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return out
