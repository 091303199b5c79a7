"""The training loop both stages share: AdamW, warmup + linear decay, grad clipping, per-epoch
evaluation, best checkpoint by a chosen metric, resume, a JSON-lines log.

Output folder layout (stage-agnostic; the model only needs `save(dir)`):
  last/                the latest epoch's checkpoint + trainer_state.pt (what --resume reads)
  best/                the best epoch's checkpoint + metrics.json
  log.jsonl            one JSON object per epoch (loss and each step's loss, lr, dev metrics, seconds)

Under torchrun (see `training.distributed`) every rank runs this loop in step; rank 0 alone
writes the folder, and the others wait at a barrier after each epoch's checkpoint.

Randomness is re-seeded from (seed, epoch) at the start of every epoch and batches are shuffled
by the caller from the same pair, so a resumed run replays exactly what an unbroken run does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from emoq_serve.config import TrainConfig
from emoq_serve.device import move_batch, resolve_device  # noqa: F401  (the trainers import them from here)
from emoq_serve.model.text_init import FRESH_FORMER_PARTS
from training.distributed import Dist

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
METRICS = ("wa", "ua", "wf1")
#: Name patterns of the trainable parts, for `TrainConfig.lr_groups` in the stage presets.
PARAM_GROUPS = {
    "aux_head": r"^aux_head\.",
    "former_fresh": rf"^former\.{FRESH_FORMER_PARTS}",  # not taken from the BERT/RoBERTa checkpoint
    "projector": r"^projector\.",
    "lora": r"\.lora_[AB]\.",
}


def preset_train_config(defaults: dict[str, dict[str, Any]], preset_name: str, **overrides: Any) -> TrainConfig:
    """`TrainConfig` from a stage's per-preset defaults with the non-None `overrides` on top."""
    values = {**defaults.get(preset_name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    if "lr_groups" in values:
        values["lr_groups"] = dict(values["lr_groups"])  # never share the preset's dict
    return TrainConfig(**values)


def flag_overrides(args: Any) -> dict[str, Any]:
    """The `TrainConfig` fields that both trainers' CLIs expose as flags (None = not given)."""
    return {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "select_metric", "threads", "device", "bf16")}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the trainers move the whole model at once)."""
    return next(model.parameters()).device


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the training device when asked (CUDA, or CPU with AVX512-BF16/AMX); else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def canonical_metric(name: str) -> str:
    """Map a --select-metric value to a metrics key ("uar" is the common alias of "ua")."""
    key = {"uar": "ua", "acc": "wa", "accuracy": "wa", "f1": "wf1"}.get(name.lower(), name.lower())
    if key not in METRICS:
        raise ValueError(f"unknown selection metric {name!r}; choose one of {', '.join(METRICS)} (or uar)")
    return key


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads when asked (2 shared cores: oversubscription is costly)."""
    if threads:
        torch.set_num_threads(threads)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters: each at the lr of the first `cfg.lr_groups` pattern its
    name matches (else `cfg.lr`); biases and norms (1-D tensors) get no weight decay. Groups
    come in parameter order, so a resumed run rebuilds the same groups as the saved optimizer."""
    patterns = [(re.compile(pattern), lr) for pattern, lr in cfg.lr_groups.items()]
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = next((lr for pattern, lr in patterns if pattern.search(name)), cfg.lr)
        decay = param.ndim >= 2
        group = groups.setdefault((lr, decay), {"params": [], "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(param)
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay to 0."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2))


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    batches_per_epoch: int,
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    here: Dist | None = None,
) -> dict[str, Any]:
    """Train `model` (an nn.Module with `save(dir)`) for cfg.epochs; returns the run summary.

    `train_batches(epoch)` yields that epoch's batches; `evaluate()` returns dev metrics with
    the keys wa/ua/wf1. With `resume`, the caller must have built the model from `out/last`
    (e.g. `EmoQStage1.load`); optimizer, schedule, epoch and best score continue from there.
    Under DDP (`here` enabled) `loss_fn` must return the global batch's loss on every rank
    (see `training.distributed`), so the logged losses are the one-process ones.
    """
    here = here or Dist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = canonical_metric(cfg.select_metric)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg.epochs * batches_per_epoch, cfg.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    start_epoch, best, best_epoch = 0, -math.inf, -1
    if resume:
        # The optimizer moves its state onto the parameters' device as it loads.
        state = torch.load(out / "last" / TRAINER_STATE, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        log.info("resuming after epoch %d (best %s %.4f at epoch %d)", state["epoch"], metric, best, best_epoch)

    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch)
        if here.rank:  # dropout masks differ between ranks, as they differ between rows in one process
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, here.rank]).generate_state(1)[0]))
        epoch_start = time.perf_counter()
        model.train()
        losses = []
        bar = tqdm(train_batches(epoch), total=batches_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not here.is_main)
        for batch in bar:
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.eval()
        with torch.no_grad():
            dev = evaluate()
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "step_losses": losses,
            "lr": scheduler.get_last_lr()[0],
            "dev": dev,
            "seconds": round(time.perf_counter() - epoch_start, 3),
        }
        improved = dev[metric] > best  # the same on every rank: dev metrics are gathered
        if improved:
            best, best_epoch = dev[metric], epoch + 1
        if here.is_main:
            if improved:
                model.save(out / "best")
                _write_json(out / "best" / "metrics.json", {"epoch": epoch + 1, "dev": dev, "select_metric": metric})
            model.save(out / "last")
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch},
                out / "last" / TRAINER_STATE,
            )
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        here.barrier()
        log.info(
            "epoch %d: loss %.4f  dev WA %.4f UA %.4f WF1 %.4f%s",
            epoch + 1, record["train_loss"], dev["wa"], dev["ua"], dev["wf1"], "  (best)" if improved else "",
        )
    return {
        "select_metric": metric,
        "best_epoch": best_epoch,
        "best_dev": json.loads((out / "best" / "metrics.json").read_text())["dev"] if best_epoch > 0 else {},
        "epochs": cfg.epochs,
        "seconds": round(time.perf_counter() - started, 3),
    }
