"""Fused multi-head attentive pooling as one Triton launch (forward only).

Layout choice: one program per batch row, holding all heads at once as an [H, d] tile. Each
program streams x[b] over N in BLOCK_N tiles (a [BLOCK_N, H, d] block per step) with an
online softmax per head, so x is read exactly once and N is unbounded by registers. Because
the row's pooled vector for every head stays in registers, the L2 norm over the full
D-vector (across heads) is computed in the same program, with no second pass or scratch
buffer. The cost is parallelism: B programs in the grid, which is right for serving shapes
(B up to hundreds, N = number of queries ~32) and acceptable for long N at small B.

Accumulation is fp32 for any input dtype; strides are passed so non-contiguous x, u and
mask need no copy; H and d are padded to powers of two with masked loads. The kernel uses
no autotune, block pointers or inline asm, so it runs under `TRITON_INTERPRET=1` on CPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from emoq_serve.kernels.reference import check_pool_shapes

#: Upper bound on BLOCK_N * BLOCK_H * BLOCK_D (fp32 elements of one x tile held in registers).
MAX_TILE_ELEMENTS = 8192


@triton.jit
def attentive_pool_fwd_kernel(
    x_ptr, u_ptr, mask_ptr, out_ptr,
    N, H, d,
    stride_xb, stride_xn, stride_xd,
    stride_uh, stride_ud,
    stride_mb, stride_mn,
    stride_ob, stride_od,
    scale, eps,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    head_mask = (offs_h[:, None] < H) & (offs_d[None, :] < d)  # [BH, BD]
    feature = offs_h[:, None] * d + offs_d[None, :]  # index into D
    u = tl.load(u_ptr + offs_h[:, None] * stride_uh + offs_d[None, :] * stride_ud, mask=head_mask, other=0.0)
    u = u.to(tl.float32) * scale  # fold 1/sqrt(d) into the query once

    # Finite "minus infinity": exp(m_old - m_new) stays defined when a tile is fully masked.
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    x_row = x_ptr + row * stride_xb
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        if HAS_MASK:
            keep = tl.load(mask_ptr + row * stride_mb + offs_n * stride_mn, mask=valid, other=0)
            valid = valid & (keep != 0)
        ptrs = x_row + offs_n[:, None, None] * stride_xn + feature[None, :, :] * stride_xd
        xt = tl.load(ptrs, mask=valid[:, None, None] & head_mask[None, :, :], other=0.0).to(tl.float32)
        scores = tl.sum(xt * u[None, :, :], axis=2)  # [BN, BH]
        scores = tl.where(valid[:, None], scores, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        rescale = tl.exp(m_i - m_new)
        p = tl.where(valid[:, None], tl.exp(scores - m_new[None, :]), 0.0)
        l_i = l_i * rescale + tl.sum(p, axis=0)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * xt, axis=0)
        m_i = m_new

    # l_i == 0 only for a row with no valid position: acc is 0 there and so is the output.
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.maximum(l_i, 1.0e-30), 0.0)
    pooled = acc * inv_l[:, None]
    norm = tl.sqrt(tl.sum(tl.sum(pooled * pooled, axis=1), axis=0))
    out = pooled / tl.maximum(norm, eps)
    tl.store(out_ptr + row * stride_ob + feature * stride_od, out.to(out_ptr.dtype.element_ty), mask=head_mask)


def attentive_pool_triton(
    x: Tensor, u: Tensor, mask: Tensor | None = None, eps: float = 1e-12, block_n: int | None = None
) -> Tensor:
    """Launch the fused kernel: x [B,N,D], u [H,d], mask [B,N] (True = valid) -> [B,D] in x.dtype.

    `block_n` overrides the N tile (a power of two); tests use it to force tiling at small N.
    """
    check_pool_shapes(x, u, mask)
    batch, length, dim = x.shape
    heads, head_dim = u.shape
    out = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    if batch == 0:
        return out
    block_h = triton.next_power_of_2(heads)
    block_d = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = min(triton.next_power_of_2(max(length, 1)), max(1, MAX_TILE_ELEMENTS // (block_h * block_d)))
    if mask is None:
        mask_arg, mask_strides = x, (0, 0)  # never read: HAS_MASK is False
    else:
        # Triton has no bool pointers; a byte view shares the storage (and strides), no copy.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = mask_arg.stride()
    attentive_pool_fwd_kernel[(batch,)](
        x, u, mask_arg, out,
        length, heads, head_dim,
        *x.stride(), *u.stride(), *mask_strides, *out.stride(),
        1.0 / math.sqrt(head_dim), eps,
        HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_n * block_h * block_d <= 4096 else 8,
    )
    return out
