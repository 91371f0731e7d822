"""lightning-nas: hardware-aware NAS, pruning and quantization search as Lightning recipes."""

__version__ = "0.1.0"
