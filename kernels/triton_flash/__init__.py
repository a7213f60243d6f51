"""Our own FlashAttention-2 kernel in Triton (flash.py), registered as the suite's backend ``triton``."""

from .flash import attention

__all__ = ["attention"]
