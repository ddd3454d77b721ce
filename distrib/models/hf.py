"""Hugging Face Llama <-> distrib: configs, parameter names, and reading a local HF folder.

Our Llama is `transformers.LlamaForCausalLM` under other parameter names (see transformer.py): the RoPE
layout is the same (rotate_half), so q/k projections need no permutation and every tensor maps
1:1 by name. The RoPE tables are derived from the config, never loaded.

Like the rest of `distrib/models/`, nothing here imports torch.distributed: placing the full
tensors read here into sharded parameters (FSDP, TP, pipeline stages) is done by
`distrib.parallel.init.load_hf_weights`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from distrib.config import ModelConfig
from distrib.errors import CheckpointError
from distrib.models.build import build_on_meta

if TYPE_CHECKING:  # imported where used: transformers is slow to import
    import transformers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# distrib name -> HF name; inside blocks, "layers.i.<ours>.weight" <-> "model.layers.i.<HF>.weight".
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# ModelConfig field -> LlamaConfig attribute, for the fields a checkpoint must agree on.
# max_seq_len is left out on purpose: with default RoPE it only sizes the position tables, so a
# model published for 131072 positions fine-tunes at 2048 with identical weights and logits.
_MATCHED_FIELDS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "vocab_size": "vocab_size",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


def to_hf_name(name: str) -> str:
    """The LlamaForCausalLM name of our parameter `name` (e.g. layers.0.attention.wq.weight)."""
    if name in _TOP:
        return _TOP[name]
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    module, _, leaf = rest.rpartition(".")
    if head != "layers" or module not in _BLOCK:
        raise KeyError(f"no Hugging Face name for parameter '{name}'")
    return f"model.layers.{index}.{_BLOCK[module]}.{leaf}"


def to_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our (full, unsharded) state dict under LlamaForCausalLM names."""
    return {to_hf_name(name): tensor for name, tensor in state.items()}


def hf_config(cfg: ModelConfig, **overrides: Any) -> transformers.LlamaConfig:
    """The `transformers.LlamaConfig` of our model shape; `overrides` are further LlamaConfig
    arguments (token ids, `attn_implementation`, ...)."""
    import transformers

    kwargs: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    return transformers.LlamaConfig(**{**kwargs, **overrides})


def _refuse(field: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(
        f"unsupported Hugging Face architecture: {field} = {value!r} (distrib supports {supported})"
    )


def _rope(hf: Any) -> tuple[str, float]:
    """(rope type, theta) from transformers >= 5 (`rope_parameters`) or 4.x (`rope_theta`,
    `rope_scaling`) configs."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    return rope_type, float(theta if theta is not None else 10000.0)


def model_config_from_hf(hf: Mapping[str, Any] | transformers.PretrainedConfig) -> ModelConfig:
    """Our ModelConfig for an HF Llama config (a config.json dict or a `PretrainedConfig`).

    Anything our Llama cannot reproduce exactly is refused with a CheckpointError naming the
    field: another model type, biases, a head dim other than dim / n_heads, RoPE scaling,
    another activation.
    """
    import transformers

    raw = dict(hf) if isinstance(hf, Mapping) else hf.to_dict()
    if raw.get("model_type") != "llama":
        raise _refuse("model_type", raw.get("model_type"), "'llama'")
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"]:
        raise _refuse("architectures", architectures, "['LlamaForCausalLM']")
    # from_dict fills the defaults a config.json written by save_pretrained leaves out.
    try:
        c = transformers.LlamaConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"not a valid LlamaConfig: {err}") from None
    for field, supported in (("attention_bias", False), ("mlp_bias", False)):
        if getattr(c, field, False) != supported:
            raise _refuse(field, getattr(c, field), repr(supported))
    if c.hidden_act != "silu":
        raise _refuse("hidden_act", c.hidden_act, "'silu' (SwiGLU)")
    head_dim = c.hidden_size // c.num_attention_heads
    if getattr(c, "head_dim", None) not in (None, head_dim):
        raise _refuse("head_dim", c.head_dim, f"hidden_size / num_attention_heads = {head_dim}")
    rope_type, rope_theta = _rope(c)
    if rope_type != "default":
        raise _refuse("rope_scaling.rope_type", rope_type, "'default' (no RoPE scaling)")
    return ModelConfig(
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_dim=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_seq_len=c.max_position_embeddings,
        rope_theta=rope_theta,
        norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(c.tie_word_embeddings),
    )


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


def check_config_matches(cfg: ModelConfig, theirs: ModelConfig, source: Path) -> None:
    """Refuse a checkpoint whose shape differs from `cfg`, naming the key and both values."""
    for field, hf_field in _MATCHED_FIELDS.items():
        ours, their = getattr(cfg, field), getattr(theirs, field)
        if ours != their:
            raise CheckpointError(
                f"model.{field} = {ours!r} but {source} has {hf_field} = {their!r}: "
                f"set --model.{field}={str(their).lower() if isinstance(their, bool) else their} "
                "to load it"
            )


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
        cfg.tie_embeddings and hf_name == _TOP["output.weight"]
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> full shape of every parameter our whole model has (a tied head once)."""
    model = build_on_meta(cfg)
    return {to_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}


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
            "of a Llama with this config"
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
