"""Training on several processes (issue 20): `torchrun --nproc-per-node 2 -m training stage1` on
CPU (gloo) against the one-process run on the same global batch.

The tiny preset has no dropout in the former or the auxiliary head (asserted below), so stage 1
is deterministic and the two runs must agree step by step: every rank computes the loss of the
global batch from rows gathered with their gradients, DDP averages the parameters' gradients,
and the result is the one-process step. The corpus and batch size are chosen so that shards
are uneven (7 = 4 + 3) and one batch per epoch (the last one, 1 example) leaves rank 1 empty.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from emoq_serve.config import preset
from emoq_serve.data import load_corpus
from emoq_serve.data.batching import shard
from emoq_serve.model.losses import mal_loss
from emoq_serve.model.stage2 import answer_loss, answer_loss_terms
from training.distributed import Dist, data_parallel, gather_rows, global_ratio
from training.stage1 import train_config, train_stage1

DATA, BATCH, EPOCHS = "synthetic:9", 7, 4  # 36 train clips: 6 steps an epoch, 24 in all
LABELS = [0, 1, 0, 2, 1, 3, 0]
ROOT = Path(__file__).resolve().parents[1]


def test_shards_are_contiguous_slices_that_rebuild_the_batch():
    batch = [9, 4, 7, 1, 3, 8, 0]
    parts = [shard(batch, rank, 2) for rank in range(2)]
    assert parts == [[9, 4, 7, 1], [3, 8, 0]]
    assert sum((shard(batch, r, 3) for r in range(3)), []) == batch
    assert [shard([5], r, 2) for r in range(2)] == [[5], []]  # a batch smaller than the world
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard(batch, 2, 2)


def _gather_worker(rank: int, world: int, port: int, batches: list[int]) -> None:
    """Checks `_one_step` for each global batch size in one process group."""
    torch.set_num_threads(1)
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


def _answer(out: torch.Tensor, labels: torch.Tensor, here: Dist) -> torch.Tensor:
    """Stage 2's loss shape: token-weighted CE whose row weights differ, so a mean of the ranks'
    means would be off; one process computes it as `answer_loss` does."""
    targets = torch.stack([labels, (labels + 1) % 4, labels], dim=1)
    weights = torch.stack([labels + 1.0, torch.ones_like(labels, dtype=torch.float32), 2.0 * labels], dim=1)
    if not here.enabled:
        return answer_loss(out.view(-1, 3, 4), targets, weights)
    return global_ratio(*answer_loss_terms(out.view(-1, 3, 4), targets, weights), here)


def _one_step(here: Dist, batch: int) -> None:
    """Each rank takes its shard of the global batch through a DDP-wrapped layer: for both
    stages' loss shapes the loss must be the one-process loss, and the gradient DDP leaves the
    one-process gradient."""
    torch.manual_seed(0)
    x, labels = torch.randn(batch, 6), torch.tensor(LABELS[:batch])
    rows = shard(list(range(batch)), here.rank, here.world_size)
    for loss_of in (_mal, _answer):
        reference, model = nn.Linear(6, 12), nn.Linear(6, 12)
        model.load_state_dict(reference.state_dict())
        ddp = data_parallel(model, here)  # held: a collected DDP module no longer reduces gradients
        # An empty shard runs one row and drops it, as `stage1.iterate_batches` arranges.
        loss = loss_of(ddp(x[rows or [0]])[: len(rows)], labels[rows], here)
        loss.backward()
        ref = loss_of(reference(x), labels, Dist())
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, name=name: f"{loss_of.__name__}, global batch {batch}, {name}.grad: {m}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_and_ddp_gradients_equal_one_process():
    """Two gloo ranks, a DDP-wrapped layer: the stage-1 (MAL) and stage-2 (token-weighted CE)
    losses from `gather_rows` are the whole batch's, and the gradient DDP leaves on every rank
    is the one-process gradient, for uneven shards (7 = 4 + 3) and a rank with none (1 = 1 + 0)."""
    # Forked, not spawned: the children reuse this process's imports (seconds instead of a minute).
    workers = mp.start_processes(_gather_worker, args=(2, _free_port(), [7, 1]), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not workers.join(timeout=1):  # raises a worker's exception
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two gloo workers did not finish within 60 s")


def _torchrun(out: Path, *flags: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training", "stage1",
           "--preset", "tiny", "--data", DATA, "--batch-size", str(BATCH), "--threads", "1", "--device", "cpu",
           "--out", str(out), *flags]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_curves_match(one: list[float], two: list[float]) -> None:
    rel = [abs(a - b) / abs(a) for a, b in zip(one, two)]
    assert max(rel) < 1e-4, f"largest relative gap {max(rel):.2e} at step {rel.index(max(rel)) + 1}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same stage-1 run in one process (in this one) and in two (torchrun)."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = load_corpus(DATA, seed=0)
    cfg = preset("tiny", labels=corpus.labels)
    assert cfg.former.dropout == 0.0  # nothing random in the forward: the runs must agree exactly
    started = time.perf_counter()
    train_stage1(cfg, train_config("tiny", epochs=EPOCHS, batch_size=BATCH, threads=1, device="cpu"), corpus, root / "one")
    one_s = time.perf_counter() - started
    done = _torchrun(root / "two", "--epochs", str(EPOCHS))
    print(f"one process {one_s:.1f} s, torchrun x2 {time.perf_counter() - started - one_s:.1f} s")
    return {"one": root / "one", "two": root / "two", "stdout": done.stdout}


@pytest.mark.slow
def test_two_process_stage1_matches_one_process_loss_curve(runs):
    one, two = _log(runs["one"]), _log(runs["two"])
    one_steps = [x for r in one for x in r["step_losses"]]
    two_steps = [x for r in two for x in r["step_losses"]]
    assert len(one_steps) == len(two_steps) == EPOCHS * 6
    _assert_curves_match(one_steps[:20], two_steps[:20])
    _assert_curves_match(one_steps, two_steps)
    assert [r["dev"] for r in two] == [r["dev"] for r in one]  # dev predictions gathered from both ranks
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test"] == json.loads((runs["one"] / "summary.json").read_text())["test"]
    a, b = load_file(runs["one"] / "last" / "model.safetensors"), load_file(runs["two"] / "last" / "model.safetensors")
    # Attention key biases shift every score of a query equally, so softmax makes their true
    # gradient zero: what they get is rounding noise, which Adam scales up to full-size steps.
    for name in (n for n in a if not n.endswith(".k.bias")):
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_only_rank0_writes_and_a_two_process_resume_continues(runs, tmp_path):
    # One record per epoch and one result line: rank 1 wrote and printed nothing.
    assert [r["epoch"] for r in _log(runs["two"])] == list(range(1, EPOCHS + 1))
    assert runs["stdout"].count("best epoch") == 1
    assert torch.load(runs["two"] / "last" / "trainer_state.pt", weights_only=True)["epoch"] == EPOCHS - 1

    # Resume both runs for one more epoch: the two-process one reads rank 0's checkpoint on
    # both ranks and continues exactly as the one-process resume does.
    for name in ("one", "two"):
        shutil.copytree(runs[name], tmp_path / name)
    corpus = load_corpus(DATA, seed=0)
    tc = train_config("tiny", epochs=EPOCHS + 1, batch_size=BATCH, threads=1, device="cpu")
    train_stage1(preset("tiny", labels=corpus.labels), tc, corpus, tmp_path / "one", resume=True)
    _torchrun(tmp_path / "two", "--epochs", str(EPOCHS + 1), "--resume")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["epoch"] for r in two] == list(range(1, EPOCHS + 2))
    _assert_curves_match(one[-1]["step_losses"], two[-1]["step_losses"])
    assert two[-1]["dev"] == one[-1]["dev"]
