"""Training on several processes: `torchrun --nproc-per-node N -m training stage1|stage2 ...`.

torchrun starts N copies of the trainer with RANK / WORLD_SIZE / LOCAL_RANK set. Each joins one
process group (gloo on CPU, NCCL on CUDA with one GPU per process, picked by LOCAL_RANK), trains
the model wrapped in `DistributedDataParallel` on its contiguous slice of every global batch
(`--batch-size` stays the global batch), and rank 0 alone writes checkpoints, logs and prints.
Started without torchrun nothing here does anything: the one-process path is unchanged.

Same results as one process for the same global batch: every rank gathers the batch's loss
inputs (SupCon's embeddings, the logits, the labels; stage 2's per-row answer terms) from all
ranks *with gradients* and computes the global batch's loss from them, so every rank holds the
one-process loss. The gather's backward sums the ranks' gradients for each rank's rows (N equal
copies of dL/drows) and DDP divides the parameters' gradients by N: the step is the one-process
step, with no per-rank mean-of-means bias when shards differ in size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and its training device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False  # a process group exists (under torchrun, even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the checkpoint the others read)."""
        if self.enabled:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """torchrun (and other launchers of `init_process_group`'s env:// method) set these."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun): who prints the result."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Dist]:
    """The run's `Dist`, joining (and at the end leaving) the process group under torchrun.

    `device` is the resolved `--device`; on CUDA each process takes GPU LOCAL_RANK. A process
    group the caller already set up is reused and left open.
    """
    if not launched_by_torchrun():
        yield Dist(device=device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    here = Dist(dist.get_rank(), dist.get_world_size(), device, enabled=True)
    quiet = [logging.getLogger(name) for name in ("training", "emoq_serve")]
    levels = [logger.level for logger in quiet]
    if not here.is_main:  # one log for the run, not N interleaved copies
        for logger in quiet:
            logger.setLevel(logging.WARNING)
    log.info("rank %d of %d on %s (%s)", here.rank, here.world_size, device, dist.get_backend())
    try:
        yield here
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        if owned:
            dist.destroy_process_group()


class _Method(nn.Module):
    """Makes `model.<method>` the forward that DDP wraps (stage 2 trains through `loss_terms`;
    DDP only synchronises gradients of graphs built through its own forward)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


def data_parallel(model: nn.Module, here: Dist, method: str = "forward", find_unused_parameters: bool = False):
    """`model.<method>`, wrapped in DistributedDataParallel when the run has a process group
    (whose construction copies rank 0's parameters and buffers to every rank)."""
    if not here.enabled:
        return getattr(model, method)
    module = model if method == "forward" else _Method(model, method)
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[here.device.index] if here.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 for shards of different sizes (a rank may even hold none), with a
    backward that sums every rank's gradient for this rank's rows (each rank's loss read them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.start + ctx.size]


def gather_rows(x: torch.Tensor, here: Dist) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order (= the global batch's order, since
    ranks hold contiguous slices of it); differentiable. Identity in a one-process run."""
    return _GatherRows.apply(x) if here.enabled else x


def global_ratio(numerator: torch.Tensor, denominator: torch.Tensor, here: Dist) -> torch.Tensor:
    """sum(numerator) / sum(denominator) over every rank's rows (e.g. stage 2's token-weighted
    mean): the global batch's value, not a mean of the ranks' ratios. Differentiable."""
    return gather_rows(numerator, here).sum() / gather_rows(denominator, here).sum()


def gather_objects(value: Any, here: Dist) -> list[Any]:
    """Every rank's (picklable) `value`, in rank order; [value] in a one-process run."""
    if not here.enabled:
        return [value]
    values: list[Any] = [None] * here.world_size
    dist.all_gather_object(values, value)
    return values


def gather_by_index(index: np.ndarray, values: np.ndarray, total: int, here: Dist) -> np.ndarray:
    """Rows predicted on every rank (`values[i]` belongs to example `index[i]`) assembled into one
    [total, ...] array in example order; rows nobody predicted stay zero."""
    parts = gather_objects((np.asarray(index), np.asarray(values)), here)
    first = next((v for _, v in parts if len(v)), np.asarray(values))
    out = np.zeros((total, *first.shape[1:]), dtype=first.dtype)
    for rows, part in parts:
        out[rows] = part
    return out


def check_same_on_every_rank(value: str, what: str, here: Dist) -> None:
    """Fail loudly when something every rank builds on its own (e.g. a tokenizer trained on the
    corpus) differs between ranks, which would otherwise train nonsense silently."""
    digests = gather_objects(hashlib.sha256(value.encode()).hexdigest(), here)
    if len(set(digests)) > 1:
        raise RuntimeError(f"{what} differs between ranks: {digests}")
