"""Model families as data: which of the model keys each Hugging Face architecture can express.

One transformer serves every family; a family only decides which options a model of it may use
(and, for export, which Hugging Face class is written). Each option is a *feature*: a model key,
a test of whether the model uses it, and how to print its value. A family lists the features it
may have (`has`) and those it always has (`needs`: Qwen2's q/k/v biases, Qwen3's qk-norm, the
experts of the MoE families). `custom` has every feature and no Hugging Face class.

Pure: no torch, no transformers; `check_family` raises ConfigError naming the key, its value and
the families that do have it, before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distrib.config.sections import ModelConfig
from distrib.errors import ConfigError


def resolved_head_dim(model: ModelConfig) -> int:
    """The width of one attention head: `model.head_dim`, or dim / n_heads when it is 0."""
    return model.head_dim or model.dim // max(model.n_heads, 1)


def resolved_moe_ffn_dim(model: ModelConfig) -> int:
    """The hidden width of one routed expert: `model.moe_ffn_dim`, or ffn_dim when it is 0."""
    return model.moe_ffn_dim or model.ffn_dim


def is_moe_layer(model: ModelConfig, layer: int) -> bool:
    """Whether block `layer` has the routed feed-forward (the first moe_dense_layers stay dense)."""
    return model.moe_experts > 0 and layer >= model.moe_dense_layers


def moe_layer_count(model: ModelConfig) -> int:
    """How many blocks have the routed feed-forward."""
    return sum(is_moe_layer(model, layer) for layer in range(model.n_layers))


@dataclass(frozen=True)
class Feature:
    """A model option that not every family has. `used` tells whether a model uses it (an
    option with an "off" value, such as sliding_window = 0, is not used when off); `moe` ones
    are only looked at when the model has experts."""

    key: str
    used: Callable[[ModelConfig], bool]
    moe: bool = False


FEATURES: dict[str, Feature] = {
    f.key: f
    for f in (
        Feature("head_dim", lambda m: m.head_dim not in (0, m.dim // max(m.n_heads, 1))),
        Feature("qkv_bias", lambda m: m.qkv_bias),
        Feature("qk_norm", lambda m: m.qk_norm),
        Feature("sliding_window", lambda m: m.sliding_window > 0),
        Feature("rope_scaling", lambda m: m.rope_scaling != "none"),
        Feature("moe_experts", lambda m: m.moe_experts > 0),
        Feature("moe_ffn_dim", lambda m: resolved_moe_ffn_dim(m) != m.ffn_dim, moe=True),
        Feature("moe_shared_experts", lambda m: m.moe_shared_experts > 0, moe=True),
        Feature("moe_dense_layers", lambda m: m.moe_dense_layers > 0, moe=True),
        Feature("moe_score", lambda m: m.moe_score != "softmax", moe=True),
        Feature("moe_norm_topk", lambda m: not m.moe_norm_topk, moe=True),
        Feature("moe_route_scale", lambda m: m.moe_route_scale != 1.0, moe=True),
        Feature("moe_bias_update_rate", lambda m: m.moe_bias_update_rate > 0, moe=True),
    )
}


@dataclass(frozen=True)
class Family:
    """One architecture: the features it may have and those it must have; its Hugging Face
    `model_type` and class name ("" for custom, which has no HF export)."""

    name: str
    model_type: str
    architecture: str
    has: frozenset[str]
    needs: frozenset[str] = frozenset()


_MOE_LAYOUT = {"moe_experts"}  # the routed feed-forward itself
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "llama", "LlamaForCausalLM", frozenset({"head_dim", "rope_scaling"})),
        Family(
            "qwen2",
            "qwen2",
            "Qwen2ForCausalLM",
            frozenset({"qkv_bias", "sliding_window"}),
            needs=frozenset({"qkv_bias"}),
        ),
        Family(
            "qwen3",
            "qwen3",
            "Qwen3ForCausalLM",
            frozenset({"head_dim", "qk_norm", "sliding_window"}),
            needs=frozenset({"qk_norm"}),
        ),
        Family(
            "mistral", "mistral", "MistralForCausalLM", frozenset({"head_dim", "sliding_window"})
        ),
        Family(
            "mixtral",
            "mixtral",
            "MixtralForCausalLM",
            frozenset({"head_dim", "sliding_window", *_MOE_LAYOUT}),
            needs=frozenset(_MOE_LAYOUT),
        ),
        Family(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            frozenset(
                {
                    "head_dim",
                    "qk_norm",
                    *_MOE_LAYOUT,
                    "moe_ffn_dim",
                    "moe_dense_layers",
                    "moe_norm_topk",
                }
            ),
            needs=frozenset({"qk_norm", *_MOE_LAYOUT}),
        ),
        Family("custom", "", "", frozenset(FEATURES)),
    )
}


def family_of_architecture(architecture: str) -> Family | None:
    """The family whose Hugging Face class is `architecture` (e.g. Qwen2ForCausalLM), if any."""
    return next((f for f in FAMILIES.values() if f.architecture == architecture), None)


def supported_architectures() -> list[str]:
    """The Hugging Face classes distrib reads and writes, one per family."""
    return [f.architecture for f in FAMILIES.values() if f.architecture]


def _value(model: ModelConfig, key: str) -> str:
    value = getattr(model, key)
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    if key == "head_dim":
        return f"{text} (dim / n_heads = {model.dim // max(model.n_heads, 1)})"
    if key == "moe_ffn_dim":
        return f"{text} (ffn_dim = {model.ffn_dim})"
    return text


def family_problem(model: ModelConfig, family: Family) -> str | None:
    """Why `model` is not a model of `family` (the first feature it uses that the family lacks,
    or lacks that the family needs), or None when it is one."""
    moe = model.moe_experts > 0
    for feature in FEATURES.values():
        if feature.moe and not moe:
            continue
        used, key = feature.used(model), feature.key
        if used and key not in family.has:
            others = [f.name for f in FAMILIES.values() if key in f.has]
            return (
                f"model.{key} = {_value(model, key)} is not part of family '{family.name}' "
                f"(families with it: {', '.join(others)})"
            )
        if not used and key in family.needs:
            others = [f.name for f in FAMILIES.values() if key not in f.needs]
            return (
                f"model.{key} = {_value(model, key)} is not part of family '{family.name}', "
                f"whose models always have it (families without it: {', '.join(others)})"
            )
    return None


def check_family(model: ModelConfig) -> None:
    """Refuse a model that uses an option its `model.family` cannot express (or lacks one the
    family always has), naming the key, its value and the families that have it."""
    problem = family_problem(model, FAMILIES[model.family])
    if problem is not None:
        raise ConfigError(f"{problem}; set model.family = 'custom' to combine options freely")


def check_model_options(model: ModelConfig) -> None:
    """The family keys' own ranges: a positive, even head dim (RoPE rotates pairs), a
    non-negative window, RoPE scaling parameters that define their scheme."""
    head_dim = resolved_head_dim(model)
    if model.head_dim < 0 or head_dim <= 0 or head_dim % 2:
        raise ConfigError(
            f"model.head_dim = {model.head_dim} gives a head dim of {head_dim}: it must be "
            "positive and even (RoPE rotates pairs of channels); 0 means dim / n_heads"
        )
    if model.head_dim == 0 and model.dim % model.n_heads:
        raise ConfigError(
            f"model.dim ({model.dim}) is not divisible by model.n_heads ({model.n_heads}): "
            "set model.head_dim explicitly"
        )
    if model.sliding_window < 0:
        raise ConfigError(
            f"model.sliding_window must be >= 0 (0: attend to every earlier position), got "
            f"{model.sliding_window}"
        )
    _check_rope_scaling(model)


def _check_rope_scaling(model: ModelConfig) -> None:
    """The keys each RoPE scaling scheme reads must define it (factors that divide, a band
    that is not empty); the message names the keys, the rule and the values."""
    if model.rope_scaling == "linear" and not model.rope_factor > 0:
        raise ConfigError(
            f"model.rope_scaling = 'linear' needs model.rope_factor > 0 (positions are divided "
            f"by it; 1 changes nothing); got {model.rope_factor}"
        )
    if model.rope_scaling == "llama3":
        ok = (
            model.rope_factor > 0
            and 0 < model.rope_low_freq_factor < model.rope_high_freq_factor
            and model.rope_original_max_seq_len > 0
        )
        if not ok:
            raise ConfigError(
                "model.rope_scaling = 'llama3' needs model.rope_factor > 0, "
                "0 < model.rope_low_freq_factor < model.rope_high_freq_factor and "
                f"model.rope_original_max_seq_len > 0; got {model.rope_factor}, "
                f"{model.rope_low_freq_factor}, {model.rope_high_freq_factor}, "
                f"{model.rope_original_max_seq_len}"
            )
    if model.rope_scaling == "yarn":
        ok = (
            model.rope_factor > 0
            and model.rope_beta_fast > model.rope_beta_slow > 0
            and model.rope_original_max_seq_len > 0
            and model.rope_attention_factor >= 0
        )
        if not ok:
            raise ConfigError(
                "model.rope_scaling = 'yarn' needs model.rope_factor > 0, "
                "model.rope_beta_fast > model.rope_beta_slow > 0, "
                "model.rope_original_max_seq_len > 0 and model.rope_attention_factor >= 0 "
                f"(0: derived from rope_factor); got rope_factor = {model.rope_factor}, "
                f"rope_beta_fast = {model.rope_beta_fast}, rope_beta_slow = "
                f"{model.rope_beta_slow}, rope_original_max_seq_len = "
                f"{model.rope_original_max_seq_len}, rope_attention_factor = "
                f"{model.rope_attention_factor}"
            )
