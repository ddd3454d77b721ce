"""LoRA: low-rank adapters on chosen linear layers of a frozen base model (Hu et al., 2021).

A targeted layer computes `W x + b + (alpha / rank) * B A dropout(x)`, with A `lora_a`
[rank, in] and B `lora_b` [out, rank]; only A and B train. B starts at zero, so at the first step
the model is exactly its base.

Our own small module rather than peft's wrappers: peft's `LoraLayer` replaces each targeted
module by a wrapper holding the original as `base_layer`, which renames its weight
(`...q_proj.base_layer.weight`). That renaming would break the tensor-parallel plan (keyed by
module names), the checkpoint names DCP reshards by and the Hugging Face name maps of import and
export. `LoRALinear` instead *is* the `nn.Linear`, its class swapped in place: `weight` and `bias`
keep their names, tensor parallelism's styles still see a Linear, and the adapters are two more
parameters beside them. `distrib export --format peft` writes them under peft's names.

Like the rest of `distrib/models/`, nothing here knows about parallelism: how the adapters are
sharded is `distrib.parallel.tensor`'s business, their layout-invariant initial values are
`Transformer.initial_value`'s (through `lora_a_initial`).

Legend: R rank, I input features, O output features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distrib.config import LoraConfig
from distrib.config.rules import lora_targets
from distrib.errors import ConfigError
from distrib.models.moe import moe_layers

ADAPTER_SUFFIXES = (".lora_a", ".lora_b")
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_adapter(name: str) -> bool:
    """Whether the parameter `name` is a LoRA adapter (trained) rather than a base weight."""
    return name.endswith(ADAPTER_SUFFIXES)


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank update; made from an existing Linear by `add_adapters`,
    never constructed directly, so the base weight keeps its name and storage."""

    rank: int
    scaling: float
    dropout: float
    lora_a: nn.Parameter  # [R, I]
    lora_b: nn.Parameter  # [O, R]

    def forward(self, x: Tensor) -> Tensor:
        """The base layer's output plus the scaled adapter path (dropout on its input only)."""
        out = super().forward(x)
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout, training=True)
        return out + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def add_adapters(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
    """Turn `linear` into a `LoRALinear` in place (same object, same base parameters) with
    float32 adapters on its device; their values come from the model's init (`lora_a_initial`,
    `lora_b` zero) or a checkpoint."""
    weight = linear.weight
    linear.__class__ = LoRALinear
    lora = linear
    assert isinstance(lora, LoRALinear)
    lora.rank, lora.scaling, lora.dropout = rank, alpha / rank, dropout
    kwargs = {"device": weight.device, "dtype": torch.float32}
    lora.lora_a = nn.Parameter(torch.zeros(rank, linear.in_features, **kwargs))
    lora.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, **kwargs))
    return lora


def lora_a_initial(shape: torch.Size, device: torch.device, generator: torch.Generator) -> Tensor:
    """`lora_a`'s initial value: kaiming-uniform as nn.Linear and peft draw it, i.e. uniform
    in +-1/sqrt(in features), from `generator` (seeded by the run's seed and the name)."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)


def _targeted(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every plain nn.Linear whose attribute name is a target."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rpartition(".")[2] in targets
    ]


def _check_model(model: nn.Module, targets: tuple[str, ...]) -> None:
    ffn = sorted({"w1", "w2", "w3"} & set(targets))
    if ffn and moe_layers(model):
        raise ConfigError(
            f"lora.targets includes {', '.join(ffn)}, but this model has Mixture-of-Experts "
            "layers, whose experts are not nn.Linear layers and get no adapters; target the "
            "attention projections (wq, wk, wv, wo) instead"
        )
    out = getattr(model, "output", None)
    emb = getattr(model, "tok_embeddings", None)
    if "output" in targets and out is not None and emb is not None and out.weight is emb.weight:
        raise ConfigError(
            "lora.targets includes output, but the output head shares its weight with the "
            "embedding (model.tie_embeddings = true): drop output from lora.targets"
        )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Give the targeted linear layers of `model` (whole or a pipeline stage, on meta, before
    any parallelization) adapters; freeze every other parameter and cast those to
    `cfg.base_dtype`. Returns the names of the layers given adapters; `cfg.rank = 0` does
    nothing."""
    if cfg.rank <= 0:
        return []
    targets = lora_targets(cfg.targets)
    _check_model(model, targets)
    found = _targeted(model, targets)
    for _, module in found:
        add_adapters(module, cfg.rank, cfg.alpha, cfg.dropout)
    base_dtype = BASE_DTYPES[cfg.base_dtype]
    for name, param in model.named_parameters():  # a tied weight comes once
        adapter = is_adapter(name)
        param.requires_grad_(adapter)
        if not adapter and param.is_floating_point() and param.dtype != base_dtype:
            # .data keeps the Parameter object, so a tied weight stays shared.
            param.data = param.data.to(base_dtype)
    return [name for name, _ in found]


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The layers of `model` that carry adapters, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (`W + scaling * B A`, computed in float32) and
    turn the layer back into a plain nn.Linear without adapters: the model that export writes.
    In place, on a whole model in one process (plain tensors, not shards); returns `model`."""
    for module in adapter_modules(model).values():
        weight = module.weight
        delta_OI = module.scaling * (module.lora_b.float() @ module.lora_a.float())
        weight.copy_((weight.float() + delta_OI).to(weight.dtype))
        del module.lora_a, module.lora_b
        for attr in ("rank", "scaling", "dropout"):
            delattr(module, attr)
        module.__class__ = nn.Linear
    return model
