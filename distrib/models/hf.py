"""Hugging Face <-> distrib: reading a local HF folder, matching its config, the init_from keys.

Every supported architecture (see `distrib.models.hf_families`, which also holds the config and
name conversions, re-exported here) is our transformer under other parameter names: the RoPE
layout is the same (rotate_half), so q/k projections need no permutation and every tensor maps
by name, the experts of an MoE layer stacked from their per-expert tensors. The RoPE tables are
derived from the config, never loaded.

Like the rest of `distrib/models/`, nothing here imports torch.distributed: placing the full
tensors read here into sharded parameters (FSDP, TP, EP, pipeline stages) is done by
`distrib.parallel.init.load_hf_weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distrib.config import ModelConfig
from distrib.config.families import FAMILIES, resolved_head_dim, resolved_moe_ffn_dim
from distrib.errors import CheckpointError, ConfigError
from distrib.models.build import build_on_meta
from distrib.models.hf_families import (
    ROPE_KEYS,
    TOP_NAMES,
    hf_config,
    hf_tensor_names,
    model_config_from_hf,
    to_hf_name,
    to_hf_state_dict,
)
from distrib.models.rope import attention_factor, model_rope_scaling

__all__ = [
    "hf_config",
    "hf_tensor_names",
    "model_config_from_hf",
    "to_hf_name",
    "to_hf_state_dict",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# ModelConfig field -> HF config field, for the fields a checkpoint must agree on (its config
# sets them). max_seq_len is left out on purpose: it only sizes the RoPE tables (scaled RoPE
# depends on rope_original_max_seq_len, not on it), so a model published for 131072 positions
# fine-tunes at 2048 with identical weights and logits. head_dim, moe_ffn_dim and
# rope_attention_factor compare as resolved (0 means the default); the moe_* ones only when the
# model has experts, the rope_* ones only when a model's rope_scaling reads them.
MATCHED_FIELDS = {
    "family": "architectures",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_dim": "intermediate_size",
    "vocab_size": "vocab_size",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "qkv_bias": "(q/k/v biases)",
    "qk_norm": "(q/k norms)",
    "sliding_window": "sliding_window",
    "rope_scaling": "rope_scaling.rope_type",
    "rope_factor": "rope_scaling.factor",
    "rope_low_freq_factor": "rope_scaling.low_freq_factor",
    "rope_high_freq_factor": "rope_scaling.high_freq_factor",
    "rope_original_max_seq_len": "rope_scaling.original_max_position_embeddings",
    "rope_beta_fast": "rope_scaling.beta_fast",
    "rope_beta_slow": "rope_scaling.beta_slow",
    "rope_attention_factor": "rope_scaling.attention_factor",
    "moe_experts": "num_experts (Mixtral: num_local_experts)",
    "moe_top_k": "num_experts_per_tok",
    "moe_ffn_dim": "moe_intermediate_size",
    "moe_dense_layers": "len(mlp_only_layers)",
    "moe_norm_topk": "norm_topk_prob",
    "moe_shared_experts": "(shared experts)",
    "moe_score": "(router scores)",
    "moe_route_scale": "(routing scale)",
}
_ROPE_SCALING_FIELDS = {f for f in MATCHED_FIELDS if f.startswith("rope_") and f != "rope_theta"}


def read_hf_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a local HF folder's config.json (refusing what we cannot load)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder: {path} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    try:
        return model_config_from_hf(raw)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _compared(cfg: ModelConfig, field: str) -> Any:
    """The value of `field` as a checkpoint is compared on: head_dim, moe_ffn_dim and
    rope_attention_factor resolved."""
    if field == "head_dim":
        return resolved_head_dim(cfg)
    if field == "moe_ffn_dim":
        return resolved_moe_ffn_dim(cfg)
    if field == "rope_attention_factor":
        return attention_factor(model_rope_scaling(cfg))
    return getattr(cfg, field)


def matched_fields(cfg: ModelConfig, theirs: ModelConfig) -> list[str]:
    """The fields a folder's config decides for `cfg`: the MoE ones only when either model has
    experts, the RoPE scaling parameters only those either model's scheme reads."""
    moe = cfg.moe_experts > 0 or theirs.moe_experts > 0
    rope = {*ROPE_KEYS.get(cfg.rope_scaling, ()), *ROPE_KEYS.get(theirs.rope_scaling, ())}
    return [
        f
        for f in MATCHED_FIELDS
        if (moe or not f.startswith("moe_"))
        and (f in rope or f == "rope_scaling" or f not in _ROPE_SCALING_FIELDS)
    ]


def _hf_value(theirs: ModelConfig, field: str) -> str:
    """How the folder's config.json says `field`, e.g. "num_key_value_heads = 2"."""
    if field == "family":
        architecture = FAMILIES[theirs.family].architecture
        return f"architectures = ['{architecture}'] (model.family = '{theirs.family}')"
    return f"{MATCHED_FIELDS[field]} = {_compared(theirs, field)!r}"


def _flag(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_config_matches(cfg: ModelConfig, theirs: ModelConfig, source: Path) -> None:
    """Refuse a checkpoint whose architecture or shape differs from `cfg`, naming the key and
    both values (the family first: it explains most other differences)."""
    for field in matched_fields(cfg, theirs):
        ours, their = _compared(cfg, field), _compared(theirs, field)
        if ours != their:
            raise CheckpointError(
                f"model.{field} = {ours!r} but {source} has {_hf_value(theirs, field)}: "
                f"set --model.{field}={_flag(getattr(theirs, field))} to load it"
            )


def init_from_model_config(cfg: ModelConfig, explicit: set[str] | frozenset[str]) -> ModelConfig:
    """`cfg` with the model keys its `init_from` folder decides taken from the folder's
    config.json (its family, shape, attention and MoE options, RoPE).

    A key in `explicit` (bare field names, e.g. {"dim"}: those the user set in the TOML file or
    on the command line) that contradicts the folder is refused with a ConfigError naming both
    values; other keys take the folder's value. Keys the folder does not decide (max_seq_len,
    the attention kernel, the MoE training options) stay as they are.
    """
    if not cfg.init_from.startswith("hf:"):
        return cfg
    path = Path(cfg.init_from.removeprefix("hf:")).expanduser()
    try:
        theirs = read_hf_config(path)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from = '{cfg.init_from}': {err}") from None
    values = {}
    for field in matched_fields(cfg, theirs):
        ours, their = _compared(cfg, field), _compared(theirs, field)
        if field in explicit and ours != their:
            raise ConfigError(
                f"model.{field} = {ours!r} contradicts model.init_from: {path / CONFIG_FILE} has "
                f"{_hf_value(theirs, field)}; drop model.{field} or set it to "
                f"{_flag(getattr(theirs, field))}"
            )
        values[field] = getattr(theirs, field)
    return dataclasses.replace(cfg, **values)


class SafetensorsFolder:
    """The tensors of an HF folder: one model.safetensors, or shards listed in an index.

    Files are memory-mapped; a tensor is read only when asked for, so a process holding one
    pipeline stage or one shard never holds the whole model in memory.
    """

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        elif (folder / WEIGHTS_FILE).is_file():
            weight_map = {}
        else:
            raise CheckpointError(
                f"no safetensors weights in {folder}: expected {WEIGHTS_FILE} or {INDEX_FILE} "
                "(.bin checkpoints are not read: re-save with save_pretrained)"
            )
        handles: dict[str, Any] = {}
        for file in sorted(set(weight_map.values())) or [WEIGHTS_FILE]:
            if not (folder / file).is_file():
                raise CheckpointError(f"{index} lists {file}, which is missing from {folder}")
            handles[file] = stack.enter_context(safe_open(folder / file, framework="pt"))
        if not weight_map:  # one file: its header lists the tensors
            weight_map = dict.fromkeys(handles[WEIGHTS_FILE].keys(), WEIGHTS_FILE)
        self._file_of = {name: handles[file] for name, file in weight_map.items()}
        self.folder = folder

    def names(self) -> set[str]:
        """Every tensor name the folder holds."""
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (no data read)."""
        return tuple(self._file_of[name].get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        """One full tensor, read from its file."""
        return self._file_of[name].get_tensor(name)


def _ignored(hf_name: str, cfg: ModelConfig) -> bool:
    # Old transformers versions saved the RoPE frequencies; a tied model's head is the embedding.
    return hf_name.endswith("rotary_emb.inv_freq") or (
        cfg.tie_embeddings and hf_name == TOP_NAMES["output.weight"]
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> full shape of every tensor our whole model reads (a tied head once; stacked
    experts as their per-expert tensors)."""
    model = build_on_meta(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters():
        hf_names = hf_tensor_names(name, cfg)
        stacked = name.endswith(("experts.w1", "experts.w2", "experts.w3"))
        shape = tuple(param.shape[1:] if stacked else param.shape)
        shapes.update(dict.fromkeys(hf_names, shape))
    return shapes


def read_tensor(weights: SafetensorsFolder, name: str, cfg: ModelConfig) -> Tensor:
    """The full tensor of our parameter `name` from an HF folder: one tensor, or the experts'
    per-expert tensors stacked on a new leading dim (read one by one from the mmap'd files)."""
    hf_names = hf_tensor_names(name, cfg)
    if not name.endswith(("experts.w1", "experts.w2", "experts.w3")):
        return weights.get(hf_names[0])
    return torch.stack([weights.get(n) for n in hf_names])


def check_tensors(weights: SafetensorsFolder, cfg: ModelConfig) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming the first one, before any read."""
    expected, have = expected_shapes(cfg), weights.names()
    for hf_name, shape in expected.items():
        if hf_name not in have:
            raise CheckpointError(f"{weights.folder}: tensor {hf_name} is missing")
        if weights.shape(hf_name) != shape:
            raise CheckpointError(
                f"{weights.folder}: tensor {hf_name} has shape {list(weights.shape(hf_name))}, "
                f"the model needs {list(shape)}"
            )
    extra = sorted(n for n in have - expected.keys() if not _ignored(n, cfg))
    if extra:
        raise CheckpointError(
            f"{weights.folder}: unexpected tensor {extra[0]} ({len(extra)} in all): not part "
            f"of a {cfg.family} model with this config"
        )


@contextlib.contextmanager
def open_hf_folder(folder: str | Path, cfg: ModelConfig) -> Iterator[SafetensorsFolder]:
    """An HF folder's weights, after checking its config and tensors against `cfg`."""
    path = Path(folder).expanduser()
    check_config_matches(cfg, read_hf_config(path), path / CONFIG_FILE)
    with contextlib.ExitStack() as stack:
        weights = SafetensorsFolder(path, stack)
        check_tensors(weights, cfg)
        yield weights
