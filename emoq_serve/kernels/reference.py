"""Multi-head attentive pooling in plain torch: the definition the kernel is tested against.

Math (ARCHITECTURE.md, "Attentive pooling"): x [B,N,D] splits into H heads of d = D/H;
s[b,n,h] = <x[b,n,h,:], u[h]> / sqrt(d); alpha = softmax over valid n; y[b,h,:] =
sum_n alpha * x[b,n,h,:]; out = y / max(||y||_2, eps) over the whole D-vector.

This function is also what training differentiates and what the ONNX export traces, so it
avoids data-dependent Python control flow and -inf (a softmax over an all -inf row is NaN):
masked scores get the most negative finite float and their weights are zeroed afterwards,
which makes a row with no valid position pool to zeros.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_pool_shapes(x: Tensor, u: Tensor, mask: Tensor | None) -> None:
    """Raise ValueError unless x [B,N,D], u [H,d] with H*d = D and mask [B,N] fit together.

    Kept out of the reference itself so tracing for export sees no shape branches; the
    dispatcher and the kernel launcher call it so a caller's mistake is reported as such.
    """
    if x.dim() != 3 or u.dim() != 2:
        raise ValueError(f"expected x [B,N,D] and u [H,d], got {tuple(x.shape)} and {tuple(u.shape)}")
    if u.shape[0] * u.shape[1] != x.shape[2]:
        raise ValueError(f"u {tuple(u.shape)} does not split D={x.shape[2]} into heads")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match x [B,N]={tuple(x.shape[:2])}")


def attentive_pool_reference(x: Tensor, u: Tensor, mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Pool x [B,N,D] with head queries u [H,d] (mask [B,N], True = valid) into [B,D] in x.dtype.

    Computed in fp32 (fp64 for fp64 input) whatever the input dtype, so fp16/bf16 callers get
    the kernel's fp32-accumulated answer up to the final rounding.
    """
    heads, head_dim = u.shape
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    xf = x.to(compute).unflatten(-1, (heads, head_dim))  # [B,N,H,d]
    scores = torch.einsum("bnhd,hd->bnh", xf, u.to(compute)) * (1.0 / math.sqrt(head_dim))
    if mask is not None:
        valid = mask.to(torch.bool).unsqueeze(-1)  # [B,N,1]
        scores = scores.masked_fill(~valid, torch.finfo(compute).min)
    weights = torch.softmax(scores, dim=1)
    if mask is not None:
        # A fully masked row has a uniform softmax over the fill value; zero it explicitly.
        weights = weights * valid
    pooled = torch.einsum("bnh,bnhd->bhd", weights, xf).flatten(1)  # [B,D]
    norm = torch.linalg.vector_norm(pooled, dim=-1, keepdim=True).clamp_min(eps)
    return (pooled / norm).to(x.dtype)
