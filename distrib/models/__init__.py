"""Model definitions: plain nn.Module code; nothing in here imports the distributed package."""

# The `attention` function is deliberately not re-exported: it would shadow the submodule of the
# same name, so `import distrib.models.attention as m` would bind the function.
from distrib.models.attention import BACKENDS, resolve_backend
from distrib.models.transformer import RMSNorm, Transformer, num_params, rope_cache

__all__ = [
    "BACKENDS",
    "RMSNorm",
    "Transformer",
    "num_params",
    "resolve_backend",
    "rope_cache",
]
