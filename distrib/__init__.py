"""distrib: distributed training for Llama-style causal language models."""

__version__ = "0.1.0"
