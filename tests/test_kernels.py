"""Attentive pooling: the Triton kernel (interpreter on CPU, compiled on CUDA) against the reference.

Triton decides between interpreter and compiler when `triton.jit` decorates a function, and its
own library (tl.sum, ...) is decorated when triton is first imported, so interpreter mode must
be on before *any* triton import. Other test files may import triton first (vLLM does), so the
interpreted kernel runs in a spawned worker process started with `TRITON_INTERPRET=1`; the
`ops` fixture installs a proxy for the ops module that forwards launches to that worker, so the
dispatcher and its autograd path run the real interpreted kernel while this process is untouched.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from types import ModuleType

import numpy as np
import pytest
import torch

from emoq_serve.kernels import BACKEND_ENV, attentive_pool, attentive_pool_reference, dispatch, pool_backend

OPS = "emoq_serve.kernels.ops.attentive_pool"
#: Output elements lie in [-1, 1] (unit-norm rows); both sides accumulate in fp32, so low-precision
#: dtypes differ by about one final rounding: fp16 ulp(1) = 1e-3, bf16 ulp(1) = 8e-3.
ATOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[ProcessPoolExecutor]:
    """One spawned worker whose environment has TRITON_INTERPRET=1 from its first instruction."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the child at spawn, then restored here
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()  # start it now, while the variable is set
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    yield pool
    pool.shutdown()


#: Evaluated in the worker: it imports the ops module itself (interpreted there). Sending
#: builtins.eval with this text, rather than the function, keeps pickling independent of the
#: proxy that the `ops` fixture puts in this process's sys.modules.
_LAUNCH = "__import__('importlib').import_module(name).attentive_pool_triton(*args, **kwargs)"


@pytest.fixture
def ops(interpreter: ProcessPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A stand-in ops module whose kernel launches run interpreted in the worker.

    Installed in sys.modules for the dispatcher, with the triton backend forced and no past failure.
    """
    proxy = ModuleType(OPS)
    proxy.attentive_pool_triton = lambda *args, **kwargs: interpreter.submit(
        eval, _LAUNCH, {"name": OPS, "args": args, "kwargs": kwargs}
    ).result()
    monkeypatch.setitem(sys.modules, OPS, proxy)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(dispatch, "_kernel_failure", None)
    return proxy


def _inputs(batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Random x, u and a mask with a fully masked row, a single-valid row and random rows."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, heads * head_dim, generator=gen) * 2).to(dtype)
    u = torch.randn(heads, head_dim, generator=gen).to(dtype)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0] = False
    if batch > 1:
        mask[1] = False
        mask[1, length - 1] = True
    return x, u, mask


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype == dtype
    assert torch.isfinite(actual.float()).all()
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL[dtype], rtol=0)


# --- the reference (the definition) -------------------------------------------------------------


def test_reference_matches_explicit_per_head_loop():
    """The vectorised reference equals a literal transcription of ARCHITECTURE.md's formula."""
    x, u, mask = _inputs(3, 6, 3, 5, torch.float64, seed=1)
    out = attentive_pool_reference(x, u, mask)
    expected = torch.zeros(3, 15, dtype=torch.float64)
    for b in range(3):
        valid = mask[b].nonzero().flatten()
        if len(valid) == 0:
            continue
        pooled = []
        for h in range(3):
            xs = x[b, valid, h * 5 : (h + 1) * 5]  # [n, d]
            alpha = torch.softmax(xs @ u[h] / math.sqrt(5), dim=0)
            pooled.append(alpha @ xs)
        y = torch.cat(pooled)
        expected[b] = y / y.norm()
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[0], torch.zeros(15, dtype=torch.float64))  # fully masked row
    norms = out[1:].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_reference_gradcheck_with_masks():
    x, u, mask = _inputs(3, 5, 2, 3, torch.float64, seed=2)
    x.requires_grad_(True)
    u.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: attentive_pool_reference(a, b, mask), (x, u))
    attentive_pool_reference(x, u, mask).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(u.grad).all()
    assert torch.equal(x.grad[0], torch.zeros_like(x.grad[0]))  # a fully masked row gets no gradient


# --- the kernel under the interpreter -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch,length,heads,head_dim",
    [(2, 1, 1, 8), (3, 7, 3, 5), (3, 33, 4, 6), (2, 32, 4, 16)],
)
def test_kernel_matches_reference(ops, batch, length, heads, head_dim, dtype):
    x, u, mask = _inputs(batch, length, heads, head_dim, dtype)
    for m in (mask, None):
        _close(ops.attentive_pool_triton(x, u, m), attentive_pool_reference(x, u, m), dtype)


@pytest.mark.parametrize("block_n", [1, 4, 16])
def test_kernel_online_softmax_across_tiles(ops, block_n):
    """Forcing small N tiles exercises the running-max rescale, incl. tiles that are fully masked."""
    x, u, mask = _inputs(3, 33, 3, 5, torch.float32, seed=3)
    mask[2, :20] = False  # several leading tiles with no valid position
    x[2, 30] *= 20  # a late large score forces the running max to move
    out = ops.attentive_pool_triton(x, u, mask, block_n=block_n)
    _close(out, attentive_pool_reference(x, u, mask), torch.float32)


def test_kernel_long_sequence(ops):
    """N > 4096 with the default tile: several tiles and an online softmax over all of them."""
    x, u, mask = _inputs(2, 4100, 2, 4, torch.float32, seed=4)
    mask[1] = True
    mask[1, 4099] = True
    _close(ops.attentive_pool_triton(x, u, mask), attentive_pool_reference(x, u, mask), torch.float32)


def test_kernel_strided_inputs(ops, interpreter):
    """Transposed and sliced x, transposed u and a sliced mask are read through their strides."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, 20, generator=gen).transpose(1, 2)[:, :, 2:14]  # [3, 20, 12], stride_d = 20
    u = torch.randn(4, 3, generator=gen).t()  # [3, 4]
    mask = (torch.rand(3, 40, generator=gen) > 0.4)[:, ::2]
    mask[0] = False
    assert not x.is_contiguous() and not u.is_contiguous() and not mask.is_contiguous()
    assert interpreter.submit(torch.Tensor.stride, x).result() == x.stride()  # strides survive the hop
    _close(ops.attentive_pool_triton(x, u, mask), attentive_pool_reference(x, u, mask), torch.float32)


def test_kernel_rejects_bad_shapes(ops):
    with pytest.raises(ValueError):
        ops.attentive_pool_triton(torch.randn(2, 3, 10), torch.randn(3, 3))
    with pytest.raises(ValueError):
        attentive_pool(torch.randn(2, 3, 12), torch.randn(3, 4), torch.ones(2, 4, dtype=torch.bool))
    assert dispatch._kernel_failure is None  # a caller's shape error does not disable the kernel


# --- the dispatcher -----------------------------------------------------------------------------


def test_dispatch_forced_triton_runs_kernel_with_reference_gradients(ops, monkeypatch):
    calls = []
    real = ops.attentive_pool_triton
    monkeypatch.setattr(ops, "attentive_pool_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, u, mask = _inputs(3, 9, 4, 3, torch.float32, seed=6)
    x.requires_grad_(True)
    u.requires_grad_(True)
    grad_out = torch.randn(3, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        out = attentive_pool(x, u, mask)
        gx, gu = torch.autograd.grad(out, (x, u), grad_out)
    assert calls == [1] and pool_backend(x) == "triton"
    ref = attentive_pool_reference(x, u, mask)
    rx, ru = torch.autograd.grad(ref, (x, u), grad_out)
    _close(out.detach(), ref.detach(), torch.float32)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gu, ru)
    # Gradient only for what asks for one (frozen pooling queries, trainable features).
    (gx_only,) = torch.autograd.grad(attentive_pool(x, u.detach(), mask).sum(), (x,))
    assert torch.isfinite(gx_only).all()


def test_dispatch_kernel_failure_warns_once_and_falls_back(ops, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile error")

    monkeypatch.setattr(ops, "attentive_pool_triton", broken)
    x, u, mask = _inputs(2, 5, 2, 4, torch.float32)
    with pytest.warns(RuntimeWarning, match="simulated compile error"):
        first = attentive_pool(x, u, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = attentive_pool(x, u, mask)
    expected = attentive_pool_reference(x, u, mask)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert pool_backend(x) == "torch"


def test_dispatch_uncompiled_kernel_on_cpu_falls_back(monkeypatch):
    """Without the interpreter a CPU launch has no driver: the real failure path, not a mock."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this whole process runs triton's interpreter, so a CPU launch succeeds")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(dispatch, "_kernel_failure", None)
    x, u, mask = _inputs(2, 5, 2, 4, torch.float32)
    with pytest.warns(RuntimeWarning, match="Triton attentive-pooling kernel failed"):
        out = attentive_pool(x, u, mask)
    assert torch.equal(out, attentive_pool_reference(x, u, mask))


def test_dispatch_backends_by_env(monkeypatch):
    monkeypatch.setattr(dispatch, "_kernel_failure", None)
    x = torch.randn(2, 3, 8)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert pool_backend(x) == ("triton" if x.is_cuda else "torch")  # auto: CPU tensors use torch
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert pool_backend(x) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "Triton")
    assert pool_backend(x) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        attentive_pool(x, torch.randn(2, 4))


def test_package_import_does_not_import_triton():
    import subprocess

    code = "import sys, emoq_serve.kernels as k; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- ONNX export of the reference (the export step traces it) -----------------------------------


class _Pool(torch.nn.Module):
    def __init__(self, u: torch.Tensor) -> None:
        super().__init__()
        self.u = torch.nn.Parameter(u)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attentive_pool_reference(x, self.u, mask)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_reference_exports_to_onnx_with_dynamic_shapes(tmp_path, dynamo):
    import onnxruntime as ort

    x, u, mask = _inputs(3, 7, 4, 6, torch.float32, seed=7)
    path = tmp_path / "pool.onnx"
    if dynamo:
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
        shapes = {"x": {0: batch, 1: length}, "mask": {0: batch, 1: length}}
        torch.onnx.export(_Pool(u), (x, mask), path, dynamo=True, dynamic_shapes=shapes,
                          input_names=["x", "mask"], output_names=["z"])
    else:
        axes = {"x": {0: "batch", 1: "length"}, "mask": {0: "batch", 1: "length"}}
        torch.onnx.export(_Pool(u), (x, mask), path, dynamo=False, dynamic_axes=axes,
                          input_names=["x", "mask"], output_names=["z"], opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2, _, mask2 = _inputs(5, 11, 4, 6, torch.float32, seed=8)  # other B and N than traced
    (z,) = session.run(None, {"x": x2.numpy(), "mask": mask2.numpy()})
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, attentive_pool_reference(x2, u, mask2).numpy(), atol=1e-5)
    assert not z[0].any()  # the fully masked row


# --- the compiled kernel on a GPU ---------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,length,heads,head_dim", [(256, 32, 12, 64), (5, 33, 3, 5), (2, 4100, 8, 96)])
def test_gpu_kernel_matches_reference(monkeypatch, batch, length, heads, head_dim, dtype):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_kernel_failure", None)
    x, u, mask = (t.cuda() for t in _inputs(batch, length, heads, head_dim, dtype))
    assert pool_backend(x) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in (mask, None, mask[:, : length // 2 + 1]):
            xm = x if m is None or m.shape[1] == length else x[:, : m.shape[1]]
            _close(attentive_pool(xm, u, m), attentive_pool_reference(xm, u, m), dtype)


@pytest.mark.gpu
@gpu
def test_gpu_gradients_match_reference(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_kernel_failure", None)
    x, u, mask = (t.cuda() for t in _inputs(8, 32, 4, 16, torch.float32, seed=9))
    x.requires_grad_(True)
    u.requires_grad_(True)
    grad_out = torch.randn(8, 64, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torch.autograd.grad(attentive_pool(x, u, mask), (x, u), grad_out)
    want = torch.autograd.grad(attentive_pool_reference(x, u, mask), (x, u), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
