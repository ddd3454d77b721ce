"""Float8 training of the transformer blocks' linear layers, through torchao.

`apply_float8` swaps each eligible `nn.Linear` of `model.layers` for torchao's `Float8Linear`
(dynamic tensorwise scaling, torchao's default recipe): the matmuls run in float8 on the tensor
cores while the weights, optimizer state and everything between the matmuls stay in their usual
dtype. torchao is imported inside the function only, so `import distrib` never needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from distrib.config.rules import check_float8
from distrib.errors import ConfigError

# torch._scaled_mm wants both matmul dims of the weight to be multiples of 16.
_FLOAT8_ALIGNMENT = 16
_MIN_CAPABILITY = (8, 9)  # Ada (L4, RTX 4090) and Hopper (H100) have float8 tensor cores


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Whether the linear `module` at `fqn` (its name in the model) trains in float8: the blocks'
    linears whose in and out features are multiples of 16; never the output head, whose
    logits feed the loss and which is most sensitive to the rounding, nor an MoE router, whose
    small logits decide which experts run. (Routed experts are stacked weights, not linears:
    they stay in the compute dtype.)"""
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    if fqn.endswith(".router"):
        return False
    return (
        module.in_features % _FLOAT8_ALIGNMENT == 0 and module.out_features % _FLOAT8_ALIGNMENT == 0
    )


def check_float8_device(device: torch.device | None = None) -> None:
    """Raise ConfigError unless `device` (None: the current CUDA device) has float8 matmuls."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is None or device.type != "cuda":
        got = "no CUDA device" if device is None else f"device {device}"
        raise ConfigError(_device_message(got))
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            _device_message(f"{name} (compute capability {capability[0]}.{capability[1]})")
        )


def _device_message(got: str) -> str:
    return (
        "float8 matmuls need an NVIDIA GPU of compute capability 8.9+ (H100, L4, ...), "
        f"got {got}; set training.float8 = false"
    )


def apply_float8(model: nn.Module, device: torch.device | None = None, *, tp: int = 1) -> None:
    """Convert the blocks' eligible linears (see `float8_filter`) to float8 training, in place.

    Call first, before TP, AC, compile and FSDP, on the model still on meta. `device` is where
    it will train (None: the current CUDA device); `tp` the tensor-parallel degree, which must be
    1: the TP plan's styles do not know float8 (torchao's float8-aware styles are not wired in).
    """
    check_float8("native", tp)
    # Before any use of torchao: a CPU or an older GPU fails here with a clear message rather
    # than inside torchao's kernels on the first step.
    check_float8_device(device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # enable_fsdp_float8_all_gather stays off: FSDP2 all-gathers the weights in bfloat16 as
    # without float8. Turning it on halves that traffic, but needs the scales precomputed after
    # every optimizer step (precompute_float8_dynamic_scale_for_fsdp), which the engine does not
    # do.
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=False)
    convert_to_float8_training(model, module_filter_fn=float8_filter, config=config)
