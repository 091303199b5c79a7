"""Attentive pooling: the torch reference (the definition) and the dispatching entry point.

Nothing here imports triton; the fused kernel in `ops/` is loaded on first use.
"""

from emoq_serve.kernels.dispatch import BACKEND_ENV, attentive_pool, pool_backend
from emoq_serve.kernels.reference import attentive_pool_reference

__all__ = ["BACKEND_ENV", "attentive_pool", "attentive_pool_reference", "pool_backend"]
