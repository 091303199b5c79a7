"""Stage 1: train the EmoQ-Former and auxiliary head with the MAL loss on a labelled corpus.

`emoq train stage1 --preset tiny --data synthetic --out runs/stage1` ends with `runs/stage1/best`
(an `EmoQStage1` checkpoint), `log.jsonl` and `summary.json` (best dev metrics and, when the
corpus has a test split, the best checkpoint's test metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emoq_serve.config import ModelConfig, TrainConfig, preset
from emoq_serve.data import load_corpus
from emoq_serve.data.batching import BucketBatchSampler, collate, shard
from emoq_serve.data.types import Corpus, Example
from emoq_serve.metrics import emotion_metrics, emotion_report
from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.model.losses import class_weights_from_labels, mal_loss
from training.common import (
    PARAM_GROUPS, autocast, fit, flag_overrides, model_device, move_batch, preset_train_config, resolve_device,
    seed_everything, set_threads,
)
from training.distributed import Dist, data_parallel, distributed, gather_by_index, gather_rows, launched_rank

log = logging.getLogger(__name__)

#: Per-preset overrides of `TrainConfig` defaults. The tiny former learns from scratch on a few
#: hundred clips: it needs a larger step and a softer SupCon temperature than the paper's 0.07
#: (at 0.07 the random initial embeddings score worse than a collapsed space, so the first
#: thing training does is collapse, and escaping that takes most of a short run).
STAGE1_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 15, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.1, "supcon_temperature": 0.5},
    # MiniLM-initialised: the body fine-tunes at 5e-5 (at the 5e-4 once used for everything its
    # loss never fell and dev accuracy swung 0.25-0.56), the new parts (queries, cross-attention,
    # pooling) need 1e-3, and the head reads unit-norm z (~1/sqrt(384) per dimension): at the
    # body's rate it stays at chance. 0.07 collapses the near-identical initial embeddings.
    # Demo corpus: dev 0.95 after 3 epochs, 0.97 after 5.
    "small": {"epochs": 5, "batch_size": 16, "lr": 5e-5, "warmup_ratio": 0.1, "supcon_temperature": 0.5,
              "lr_groups": {PARAM_GROUPS["aux_head"]: 2e-3, PARAM_GROUPS["former_fresh"]: 1e-3}},
}
# The smollm2 preset's audio encoder and former are the small preset's (only its LLM differs).
STAGE1_DEFAULTS["smollm2"] = STAGE1_DEFAULTS["small"]


def train_config(preset_name: str, **overrides: Any) -> TrainConfig:
    """The preset's defaults for this stage with the non-None `overrides` (CLI flags) on top."""
    return preset_train_config(STAGE1_DEFAULTS, preset_name, **overrides)


def iterate_batches(
    examples: Sequence[Example], model: EmoQStage1, batch_size: int, shuffle_seed: int | None = None, epoch: int = 0,
    rank: int = 0, world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated, length-bucketed batches; shuffled reproducibly by (shuffle_seed, epoch), or in
    length order when `shuffle_seed` is None (evaluation). `batch["index"]` maps rows back to
    `examples`, since neither order is the examples' own. Batches come on the model's device.

    With `world_size` > 1 each global batch of `batch_size` yields only this rank's contiguous
    slice of it (every rank draws the same global batches). A rank whose slice is empty (a last
    batch smaller than the world) gets one row of the batch with an empty `index`: it runs the
    forward DDP expects of every rank, and the loss ignores the rows past `len(index)`."""
    device = model_device(model)
    for indices in batch_sampler(examples, batch_size, shuffle_seed, epoch):
        mine = shard(indices, rank, world_size) if world_size > 1 else indices
        yield collate_batch(examples, mine or indices[:1], mine, model, device)


def eval_batches(examples: Sequence[Example], model: EmoQStage1, batch_size: int, here: Dist) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches (length order) dealt round-robin to the ranks: each collates and
    predicts only its share, and `gather_by_index` puts the predictions back together."""
    device = model_device(model)
    for number, indices in enumerate(batch_sampler(examples, batch_size)):
        if number % here.world_size == here.rank:
            yield collate_batch(examples, indices, indices, model, device)


def batch_sampler(examples: Sequence[Example], batch_size: int, shuffle_seed: int | None = None, epoch: int = 0) -> BucketBatchSampler:
    """Training's batches of `examples`: length-bucketed, shuffled per epoch when seeded."""
    # Audio length when there is audio (HuBERT cost dominates), else transcript length, so
    # text-only corpora (MELD without clips) are bucketed too instead of padded at random.
    lengths = [len(e.transcript) if e.audio is None else len(e.audio) for e in examples]
    sampler = BucketBatchSampler(lengths, batch_size, shuffle=shuffle_seed is not None, seed=shuffle_seed or 0)
    sampler.set_epoch(epoch)
    return sampler


def collate_batch(examples: Sequence[Example], rows: list[int], index: list[int], model: EmoQStage1, device: torch.device) -> dict[str, Any]:
    """`rows` collated on `device`, with `index` (the rows that count) as batch["index"]."""
    batch = collate([examples[i] for i in rows], model.text_tokenizer, model.cfg.former.max_text_tokens,
                    model.cfg.former.context_turns)
    batch["index"] = torch.tensor(index, dtype=torch.int64)  # rows' positions in `examples`
    return move_batch(batch, device)


@torch.no_grad()
def predict(
    model: EmoQStage1, examples: Sequence[Example], batch_size: int, bf16: bool = False, here: Dist | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(reference labels, argmax of the auxiliary head) over a split, in example order; under
    DDP the ranks share the batches and every rank gets all predictions."""
    here = here or Dist()
    model.eval()
    index, y_pred = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    with autocast(model_device(model), bf16):
        for batch in eval_batches(examples, model, batch_size, here):
            index.append(batch["index"])
            y_pred.append(model(batch)[1].argmax(-1).cpu())
    y_true = np.array([e.label for e in examples], dtype=np.int64)
    return y_true, gather_by_index(torch.cat(index).numpy(), torch.cat(y_pred).numpy(), len(examples), here)


def evaluate(
    model: EmoQStage1, examples: Sequence[Example], batch_size: int, bf16: bool = False, here: Dist | None = None
) -> dict[str, float]:
    """WA/UA/WF1 of the auxiliary head on a split."""
    return emotion_metrics(*predict(model, examples, batch_size, bf16, here), len(model.cfg.labels))


def stage1_loss(forward: Any, batch: dict[str, torch.Tensor], weights: torch.Tensor, cfg: TrainConfig,
                here: Dist | None = None) -> torch.Tensor:
    """MAL (SupCon + focal) on one batch through `forward` (the model, or its DDP wrapper)."""
    here = here or Dist()
    with autocast(batch["labels"].device, cfg.bf16):
        z, logits = forward(batch)
    # The global batch's loss on every rank: SupCon contrasts each anchor with the whole
    # batch, so the rows are gathered (with their gradients) before the loss.
    rows = len(batch["index"])
    z, logits, labels = (gather_rows(t[:rows], here) for t in (z.float(), logits.float(), batch["labels"]))
    # The loss in fp32: bf16's 8-bit mantissa is too coarse for SupCon's exp(sim / temperature).
    return mal_loss(z, logits, labels, weights,
                    temperature=cfg.supcon_temperature, gamma=cfg.focal_gamma, lam=cfg.mal_lambda)


def train_stage1(
    model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Corpus, out_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    """Train, keep the best dev checkpoint in out_dir/best, and return (and write) the summary."""
    out = Path(out_dir)
    if tuple(model_cfg.labels) != tuple(corpus.labels):
        raise ValueError(f"model labels {model_cfg.labels} differ from the corpus labels {corpus.labels}")
    if not corpus.train or not corpus.dev:
        raise ValueError("stage 1 needs non-empty train and dev splits")
    set_threads(train_cfg.threads)
    with distributed(resolve_device(train_cfg.device)) as here:
        return _train(model_cfg, train_cfg, corpus, out, resume, here)


def _train(model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Corpus, out: Path, resume: bool, here: Dist) -> dict[str, Any]:
    seed_everything(train_cfg.seed)
    device = here.device
    model = (EmoQStage1.load(out / "last") if resume else EmoQStage1(model_cfg)).to(device)
    forward = data_parallel(model, here)
    weights = class_weights_from_labels([e.label for e in corpus.train], len(corpus.labels), train_cfg.class_weighting)
    log.info("stage 1: %d train / %d dev examples, class weights %s", len(corpus.train), len(corpus.dev), weights.tolist())

    summary = fit(
        model,
        train_batches=lambda epoch: iterate_batches(
            corpus.train, model, train_cfg.batch_size, train_cfg.seed, epoch, rank=here.rank, world_size=here.world_size
        ),
        batches_per_epoch=-(-len(corpus.train) // train_cfg.batch_size),
        loss_fn=lambda batch: stage1_loss(forward, batch, weights, train_cfg, here),
        evaluate=lambda: evaluate(model, corpus.dev, train_cfg.batch_size, train_cfg.bf16, here),
        cfg=train_cfg,
        out_dir=out,
        resume=resume,
        here=here,
    )
    summary["train_config"] = dataclasses.asdict(train_cfg)
    summary["world_size"] = here.world_size
    if corpus.test:
        best = EmoQStage1.load(out / "best").to(device)
        summary["test"] = emotion_report(*predict(best, corpus.test, train_cfg.batch_size, train_cfg.bf16, here), corpus.labels)
    if here.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    here.barrier()  # the summary is on disk before any rank returns
    return summary


def run(args: argparse.Namespace) -> int:
    """`emoq train stage1`: build configs from the flags, load the corpus, train."""
    train_cfg = train_config(args.preset, **flag_overrides(args))
    corpus = load_corpus(args.data, train_cfg.seed)
    model_cfg = preset(args.preset, labels=corpus.labels)
    if args.feature_cache:
        model_cfg.audio.cache_dir = args.feature_cache
    summary = train_stage1(model_cfg, train_cfg, corpus, args.out, resume=args.resume)
    if launched_rank():
        return 0
    best = summary["best_dev"]
    print(
        f"best epoch {summary['best_epoch']}: dev WA {best['wa']:.4f} UA {best['ua']:.4f} WF1 {best['wf1']:.4f}"
        f" -> {Path(args.out) / 'best'} ({summary['seconds']:.1f} s)"
    )
    return 0
