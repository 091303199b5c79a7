"""A worker process for `test_distributed_training` (spawned twice with gloo): a module of its
own so the children import torch and the loss, not the whole training stack."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from emoq_serve.data.batching import shard
from emoq_serve.model.losses import mal_loss
from training.distributed import Dist, data_parallel, gather_rows

LABELS = [0, 1, 0, 2, 1, 3, 0]


def gather_worker(rank: int, world: int, port: int, batches: list[int]) -> None:
    """Checks `_one_step` for each global batch size in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for batch in batches:
            _one_step(Dist(rank, world, torch.device("cpu"), enabled=True), batch)
    finally:
        dist.destroy_process_group()


def _mal(out: torch.Tensor, labels: torch.Tensor, here: Dist) -> torch.Tensor:
    """Stage 1's loss shape: unit-norm z and logits from one layer's output, MAL on the gathered rows."""
    z, logits = nn.functional.normalize(out[:, :8], dim=-1), out[:, 8:]
    return mal_loss(gather_rows(z, here), gather_rows(logits, here), gather_rows(labels, here), temperature=0.5)


def _one_step(here: Dist, batch: int) -> None:
    """Each rank takes its shard of the global batch through a DDP-wrapped layer: the loss must
    be the one-process loss, and the gradient DDP leaves the one-process gradient."""
    torch.manual_seed(0)
    x, labels = torch.randn(batch, 6), torch.tensor(LABELS[:batch])
    reference, model = nn.Linear(6, 12), nn.Linear(6, 12)
    model.load_state_dict(reference.state_dict())
    rows = shard(list(range(batch)), here.rank, here.world_size)
    # An empty shard runs one row and drops it, as `stage1.iterate_batches` arranges.
    ddp = data_parallel(model, here)  # held: a collected DDP module no longer reduces gradients
    out = ddp(x[rows or [0]])[: len(rows)]
    loss = _mal(out, labels[rows], here)
    loss.backward()
    ref = _mal(reference(x), labels, Dist())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"global batch {batch}, {name}.grad: {m}")
