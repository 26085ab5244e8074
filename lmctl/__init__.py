"""lmctl: the lifecycle of a causal language model, from LoRA fine-tuning to serving."""

__version__ = "0.2.0"
