"""Per-architecture adapters between our `ModelConfig` / parameter names and Hugging Face's.

Six architectures, one per family (`distrib.config.families`): LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, MixtralForCausalLM and
Qwen3MoeForCausalLM. For each: config.json -> ModelConfig (`model_config_from_hf`, refusing
with a CheckpointError naming the field whatever our transformer would not reproduce exactly),
ModelConfig -> the transformers config of export (`hf_config`), and our parameter names <->
the names on disk (`hf_tensor_names`).

Names on disk are what `save_pretrained` writes, in transformers 4.x and 5.x alike: every
expert of an MoE layer has tensors of its own (`...experts.3.w1.weight`), whereas our experts
are stacked on a leading expert dim (`feed_forward.experts.w1` [E, F, D]); transformers 5
fuses them in memory (`gate_up_proj`) but still reads and writes them one per expert. So
reading stacks the per-expert tensors and export unstacks them; neither goes through an
in-memory HF model.

The routing bias of auxiliary-loss-free balancing (`feed_forward.expert_bias`, a buffer) has
no place in these architectures: it is left at zero on import and must be zero to export.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distrib.config import ModelConfig
from distrib.config.families import (
    FAMILIES,
    Family,
    family_of_architecture,
    family_problem,
    resolved_head_dim,
    resolved_moe_ffn_dim,
    supported_architectures,
)
from distrib.errors import CheckpointError, ExportError

if TYPE_CHECKING:  # imported where used: transformers is slow to import
    import transformers

# distrib name -> HF name; inside blocks, "layers.i.<ours>.<leaf>" <-> "model.layers.i.<HF>.<leaf>".
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Buffers of ours that no HF family stores (see the module docstring).
NOT_IN_HF = ("feed_forward.expert_bias",)


@dataclass(frozen=True)
class MoeNames:
    """Where an MoE family keeps the router and the experts, and its names for w1 / w2 / w3."""

    router: str
    experts: str
    w1: str
    w2: str
    w3: str


_MOE_NAMES = {
    "mixtral": MoeNames("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w2", "w3"),
    "qwen3_moe": MoeNames("mlp.gate", "mlp.experts", "gate_proj", "down_proj", "up_proj"),
}
_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "mixtral": "MixtralConfig",
    "qwen3_moe": "Qwen3MoeConfig",
}


# --- names -----------------------------------------------------------------------------------


def hf_tensor_names(name: str, cfg: ModelConfig) -> list[str]:
    """The on-disk HF names that make up our parameter `name`: one, or for stacked experts
    (`layers.i.feed_forward.experts.w1`) one per expert, in expert order."""
    if name in TOP_NAMES:
        return [TOP_NAMES[name]]
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    moe = _MOE_NAMES.get(cfg.family)
    if head == "layers" and moe is not None:
        if rest == "feed_forward.router.weight":
            return [f"model.layers.{index}.{moe.router}.weight"]
        if rest in (
            "feed_forward.experts.w1",
            "feed_forward.experts.w2",
            "feed_forward.experts.w3",
        ):
            hf_w = getattr(moe, rest.rpartition(".")[2])
            prefix = f"model.layers.{index}.{moe.experts}"
            return [f"{prefix}.{e}.{hf_w}.weight" for e in range(cfg.moe_experts)]
    return [to_hf_name(name)]


def to_hf_name(name: str) -> str:
    """The HF name of our parameter `name` outside the experts (e.g. layers.0.attention.wq.weight
    -> model.layers.0.self_attn.q_proj.weight); the same in every family."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    module, _, leaf = rest.rpartition(".")
    if head != "layers" or module not in _BLOCK:
        raise KeyError(f"no Hugging Face name for parameter '{name}'")
    return f"model.layers.{index}.{_BLOCK[module]}.{leaf}"


def to_hf_state_dict(state: Mapping[str, Any], cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Our (full, unsharded) state dict under the on-disk HF names of `cfg`'s family (Llama's
    when None): stacked experts split into one tensor each (views of the stack), buffers that no
    HF family stores left out."""
    cfg = cfg or ModelConfig()
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        if name.endswith(NOT_IN_HF):
            continue
        hf_names = hf_tensor_names(name, cfg)
        if len(hf_names) == 1 and not name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            out[hf_names[0]] = tensor
        else:
            out.update(zip(hf_names, tensor.unbind(0), strict=True))
    return out


# --- config.json -> ModelConfig ------------------------------------------------------------------


def _refuse(field: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(
        f"unsupported Hugging Face architecture: {field} = {value!r} (distrib supports {supported})"
    )


def _family_of(raw: Mapping[str, Any]) -> Family:
    """The family of a config.json: by its `architectures`, else by its `model_type`."""
    supported = ", ".join(supported_architectures())
    architectures = raw.get("architectures")
    by_type = next((f for f in FAMILIES.values() if f.model_type == raw.get("model_type")), None)
    if not architectures:
        if by_type is None or not by_type.architecture:
            raise _refuse("model_type", raw.get("model_type"), supported)
        return by_type
    family = family_of_architecture(architectures[0]) if len(architectures) == 1 else None
    if family is None:
        raise _refuse("architectures", architectures, supported)
    if raw.get("model_type", family.model_type) != family.model_type:
        raise _refuse(
            "model_type", raw.get("model_type"), f"'{family.model_type}' for {architectures[0]}"
        )
    return family


def _config_class(family: Family) -> type[transformers.PretrainedConfig]:
    import transformers

    cls = getattr(transformers, _CONFIG_CLASSES[family.name], None)
    if cls is None:
        raise CheckpointError(
            f"{family.architecture} needs a newer transformers than {transformers.__version__} "
            f"(it has no {_CONFIG_CLASSES[family.name]}); pip install -U transformers"
        )
    return cls


def rope_parameters(hf: Any) -> dict[str, Any]:
    """The RoPE parameters (type, theta, scaling) of transformers >= 5 (`rope_parameters`) or
    4.x (`rope_theta` and `rope_scaling`) configs, as one dict with `rope_type`/`rope_theta`."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    params["rope_theta"] = float(theta if theta is not None else 10000.0)
    return params


# model.rope_scaling (but none) -> {ModelConfig field: key in HF's rope_scaling dict (5.x:
# rope_parameters)}, the keys each scheme reads; HF's rope_type is the scheme's name.
ROPE_KEYS: dict[str, dict[str, str]] = {
    "linear": {"rope_factor": "factor"},
    "llama3": {
        "rope_factor": "factor",
        "rope_low_freq_factor": "low_freq_factor",
        "rope_high_freq_factor": "high_freq_factor",
        "rope_original_max_seq_len": "original_max_position_embeddings",
    },
    "yarn": {
        "rope_factor": "factor",
        "rope_original_max_seq_len": "original_max_position_embeddings",
        "rope_beta_fast": "beta_fast",
        "rope_beta_slow": "beta_slow",
        "rope_attention_factor": "attention_factor",
    },
}
# YaRN keys transformers fills in when absent (beta 32 / 1, the attention factor from the
# factor) as our defaults do; every other key must be there.
_ROPE_OPTIONAL = {"beta_fast", "beta_slow", "attention_factor"}


def _scaling_keys(params: dict[str, Any], scheme: str) -> dict[str, Any]:
    """Our rope_* keys for HF RoPE parameters of a supported `scheme` (rope_type)."""
    if scheme == "yarn" and not params.get("truncate", True):
        raise _refuse("rope_scaling.truncate", params["truncate"], "true (the default)")
    if scheme == "yarn" and params.get("mscale") and params.get("mscale_all_dim"):
        raise _refuse("rope_scaling.mscale_all_dim", params["mscale_all_dim"], "YaRN without it")
    keys: dict[str, Any] = {"rope_scaling": scheme}
    for field, key in ROPE_KEYS[scheme].items():
        value = params.get(key)
        if key in _ROPE_OPTIONAL and not value:
            continue  # transformers' default, which is ours (beta 32 / 1, a derived factor)
        if value is None:
            raise _refuse(f"rope_scaling.{key}", value, f"a number for rope_type '{scheme}'")
        keys[field] = int(value) if field == "rope_original_max_seq_len" else float(value)
    return keys


def _rope_keys(c: Any, family: Family) -> dict[str, Any]:
    params = rope_parameters(c)
    rotary = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    if rotary not in (None, 1.0):
        raise _refuse("partial_rotary_factor", rotary, "1.0 (RoPE on the whole head)")
    keys: dict[str, Any] = {"rope_theta": params["rope_theta"]}
    scaled = "rope_scaling" in family.has
    allowed = "'default', 'linear', 'llama3' or 'yarn'" if scaled else "'default'"
    if params["rope_type"] in ROPE_KEYS and scaled:
        keys.update(_scaling_keys(params, params["rope_type"]))
    elif params["rope_type"] != "default":
        raise _refuse("rope_scaling.rope_type", params["rope_type"], allowed)
    return keys


def _window(c: Any, family: Family) -> int:
    """The one sliding window every layer uses (0: none); a window on some layers only is
    refused, since our layers all attend alike."""
    window = getattr(c, "sliding_window", None) or 0
    if family.name in ("qwen2", "qwen3"):
        if not getattr(c, "use_sliding_window", False):
            return 0
        layer_types = getattr(c, "layer_types", None)
        if layer_types is None:  # transformers 4.x: the layers from max_window_layers on slide
            first = getattr(c, "max_window_layers", 0)
            layer_types = ["sliding" if i >= first else "full" for i in range(c.num_hidden_layers)]
        sliding = {str(t).startswith("sliding") for t in layer_types}
        if sliding == {True, False}:
            raise _refuse(
                "use_sliding_window",
                True,
                "a window on every layer or none (max_window_layers = "
                f"{getattr(c, 'max_window_layers', None)} leaves some layers without one)",
            )
        return window if sliding == {True} else 0
    if family.name == "qwen3_moe" and getattr(c, "use_sliding_window", False):
        raise _refuse("use_sliding_window", True, "false for Qwen3MoeForCausalLM")
    return window


def _moe_keys(c: Any, family: Family) -> dict[str, Any]:
    if family.name == "mixtral":
        jitter = getattr(c, "router_jitter_noise", 0.0) or 0.0
        if jitter:
            raise _refuse("router_jitter_noise", jitter, "0.0 (deterministic routing)")
        return {
            "moe_experts": c.num_local_experts,
            "moe_top_k": c.num_experts_per_tok,
            "moe_norm_topk": True,
        }
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", 0)
    if not experts:
        raise _refuse("num_experts", experts, "at least one expert")
    if c.decoder_sparse_step != 1:
        raise _refuse(
            "decoder_sparse_step", c.decoder_sparse_step, "1 (MoE after the dense layers)"
        )
    dense = sorted(c.mlp_only_layers or [])
    if dense != list(range(len(dense))):
        raise _refuse("mlp_only_layers", dense, "a leading range [0, 1, ..., n - 1]")
    return {
        "moe_experts": experts,
        "moe_top_k": c.num_experts_per_tok,
        "moe_ffn_dim": c.moe_intermediate_size,
        "moe_dense_layers": len(dense),
        "moe_norm_topk": bool(c.norm_topk_prob),
    }


def _check_biases(c: Any, family: Family) -> None:
    # Llama's and Qwen3's attention_bias puts a bias on o_proj too, which ours never has; Qwen2's
    # q/k/v biases are not a config field (always there), Mistral and Mixtral have none.
    for field in ("attention_bias", "mlp_bias"):
        if getattr(c, field, False):
            raise _refuse(field, True, f"false for {family.architecture}")


def model_config_from_hf(hf: Mapping[str, Any] | transformers.PretrainedConfig) -> ModelConfig:
    """Our ModelConfig (family set) for a supported HF config (a config.json dict or a
    `PretrainedConfig`); anything our transformer would not reproduce exactly is refused with a
    CheckpointError naming the field: another architecture or activation, biases the family
    does not have, a partial sliding window, unsupported RoPE scaling, other MoE layouts."""
    raw = dict(hf) if isinstance(hf, Mapping) else hf.to_dict()
    family = _family_of(raw)
    try:  # from_dict fills the class defaults a hand-written config.json leaves out
        c = _config_class(family).from_dict(raw)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"not a valid {_CONFIG_CLASSES[family.name]}: {err}") from None
    if c.hidden_act != "silu":
        raise _refuse("hidden_act", c.hidden_act, "'silu' (SwiGLU)")
    _check_biases(c, family)
    default_head_dim = c.hidden_size // c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or default_head_dim
    keys: dict[str, Any] = {
        "family": family.name,
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads or c.num_attention_heads,
        "ffn_dim": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "max_seq_len": c.max_position_embeddings,
        "norm_eps": c.rms_norm_eps,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "head_dim": 0 if head_dim == default_head_dim else head_dim,
        "qkv_bias": family.name == "qwen2",
        "qk_norm": family.name in ("qwen3", "qwen3_moe"),
        "sliding_window": _window(c, family),
        **_rope_keys(c, family),
    }
    if "moe_experts" in family.needs:
        keys.update(_moe_keys(c, family))
    model = ModelConfig(**keys)
    problem = family_problem(model, family)
    if problem is not None:
        raise CheckpointError(f"unsupported Hugging Face architecture: {problem}")
    return model


# --- ModelConfig -> transformers config (export) -------------------------------------------------


def _check_exportable(cfg: ModelConfig) -> Family:
    family = FAMILIES[cfg.family]
    if not family.architecture:
        raise ExportError(
            f"model.family = '{cfg.family}' has no Hugging Face class to export to; families "
            f"with one: {', '.join(f.name for f in FAMILIES.values() if f.architecture)}"
        )
    problem = family_problem(cfg, family)
    if problem is not None:
        raise ExportError(f"cannot export as {family.architecture}: {problem}")
    return family


def _family_kwargs(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    window = cfg.sliding_window
    if family.name == "llama":
        return {"attention_bias": False, "mlp_bias": False}
    if family.name in ("qwen2", "qwen3"):
        # Every layer or none slides: the window starts at layer 0 (max_window_layers = 0).
        kwargs = {
            "use_sliding_window": window > 0,
            "sliding_window": window or None,
            "max_window_layers": 0 if window else cfg.n_layers,
        }
        return kwargs | ({"attention_bias": False} if family.name == "qwen3" else {})
    if family.name == "mistral":
        return {"sliding_window": window or None}
    if family.name == "mixtral":
        return {
            "sliding_window": window or None,
            "num_local_experts": cfg.moe_experts,
            "num_experts_per_tok": cfg.moe_top_k,
            "intermediate_size": resolved_moe_ffn_dim(cfg),
            "router_jitter_noise": 0.0,
        }
    return {  # qwen3_moe
        "attention_bias": False,
        "use_sliding_window": False,
        "num_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "moe_intermediate_size": resolved_moe_ffn_dim(cfg),
        "norm_topk_prob": cfg.moe_norm_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.moe_dense_layers)),
    }


def legacy_config_keys(cfg: ModelConfig) -> dict[str, Any]:
    """Keys config.json also needs for transformers 4.x readers, which a transformers 5 config
    no longer writes: RoPE as `rope_theta` / `rope_scaling` (5.x: `rope_parameters`) and
    Qwen3-MoE's `num_experts` (5.x writes its alias `num_local_experts`)."""
    keys: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    if cfg.rope_scaling != "none":
        keys["rope_scaling"] = {
            "rope_type": cfg.rope_scaling,
            **{
                key: getattr(cfg, field)
                for field, key in ROPE_KEYS[cfg.rope_scaling].items()
                if getattr(cfg, field) or key not in _ROPE_OPTIONAL  # 0: transformers derives it
            },
        }
    if cfg.family == "qwen3_moe":
        keys["num_experts"] = cfg.moe_experts
    return keys


def hf_config(cfg: ModelConfig, **overrides: Any) -> transformers.PretrainedConfig:
    """The transformers config of our model (the class `model.family` names); `overrides` are
    further config arguments (token ids, `attn_implementation`, ...). Refuses (ExportError) a
    custom family or options the family cannot express."""
    family = _check_exportable(cfg)
    legacy = legacy_config_keys(cfg)
    kwargs: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": resolved_head_dim(cfg),
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "architectures": [family.architecture],
        **({"rope_scaling": legacy["rope_scaling"]} if legacy["rope_scaling"] else {}),
        **_family_kwargs(cfg, family),
    }
    try:
        cls = _config_class(family)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    return cls(**{**kwargs, **overrides})
