"""Pick the pooling implementation per call: the fused Triton kernel on CUDA, the reference elsewhere.

`EMOQ_POOL_BACKEND` = `auto` (default) | `triton` | `torch` forces a choice (read per call, so
tests and benchmarks can flip it). The kernel is imported only when first chosen, so CPU-only
processes never touch triton. If the kernel cannot run (no driver, compile error, CPU tensors
without the interpreter) the first failure is warned about once and every later call uses the
reference: serving must degrade, not crash.

Training differentiates through `attentive_pool` too: `_FusedAttentivePool` runs the kernel
forward and backpropagates by recomputing the reference under autograd. Pooling is a tiny
fraction of a step, so recompute costs little and keeps a single source of truth for gradients.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from emoq_serve.kernels.reference import attentive_pool_reference, check_pool_shapes

BACKEND_ENV = "EMOQ_POOL_BACKEND"
BACKENDS = ("auto", "triton", "torch")

#: The kernel's first failure in this process; once set, the reference is used for good.
_kernel_failure: Exception | None = None


def requested_backend() -> str:
    """The backend named by `EMOQ_POOL_BACKEND`, validated (a typo should fail loudly)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def pool_backend(x: Tensor) -> str:
    """`"triton"` or `"torch"`: what `attentive_pool` will try for x (for logs and timings)."""
    name = requested_backend()
    wants_kernel = name == "triton" or (name == "auto" and x.is_cuda)
    return "triton" if wants_kernel and _kernel_failure is None else "torch"


class _FusedAttentivePool(torch.autograd.Function):
    """Triton forward, reference-recompute backward."""

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, mask: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        from emoq_serve.kernels.ops.attentive_pool import attentive_pool_triton

        ctx.save_for_backward(x, u, mask)
        ctx.eps = eps
        return attentive_pool_triton(x.detach(), u.detach(), mask, eps)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        x, u, mask = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_(ctx.needs_input_grad[0])
            ur = u.detach().requires_grad_(ctx.needs_input_grad[1])
            out = attentive_pool_reference(xr, ur, mask, ctx.eps)
            wanted = [t for t in (xr, ur) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (next(grads) if xr.requires_grad else None, next(grads) if ur.requires_grad else None, None, None)


def attentive_pool(x: Tensor, u: Tensor, mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Attentive pooling with the same contract as `attentive_pool_reference`, dispatched per call."""
    global _kernel_failure
    check_pool_shapes(x, u, mask)  # a caller's mistake must raise, not disable the kernel
    if pool_backend(x) == "triton":
        try:
            return _FusedAttentivePool.apply(x, u, mask, eps)
        except Exception as err:  # noqa: BLE001 - any kernel failure degrades to the reference
            _kernel_failure = err
            warnings.warn(
                f"Triton attentive-pooling kernel failed ({type(err).__name__}: {err}); "
                "using the torch reference from now on",
                RuntimeWarning,
                stacklevel=2,
            )
    return attentive_pool_reference(x, u, mask, eps)
