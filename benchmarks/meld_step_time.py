"""Stage-1 training step time on MELD for a recipe's model: fp32 vs bf16 autocast, length-bucketed
vs plain (shuffled) batches.

    python -m benchmarks.meld_step_time --data ../shared/data/meld --recipe meld-text-base \
        --steps 10 --warmup 2 --threads 1 --out benchmarks/results/meld_step_time.json

Each variant trains its own copy of the recipe's model (same seed, same weights) on the first
`--steps` batches of epoch 0: the bucketed ones come from the trainer's own sampler, the plain
ones are the same examples drawn in a seeded random order. The variants take turns step by step
so load drifts hit them alike; the first `--warmup` steps of each are not timed. Padding is the
share of the batches' text positions that are padding (MELD has no audio here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emoq_serve.config import preset
from emoq_serve.data import load_corpus
from emoq_serve.hostinfo import cpu_class
from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.model.losses import class_weights_from_labels
from training.common import make_optimizer, seed_everything, set_threads
from training.recipes import RECIPES
from training.stage1 import batch_sampler, collate_batch, stage1_loss


def batches(examples, model, batch_size: int, steps: int, bucketed: bool, seed: int) -> list[dict]:
    if bucketed:
        order = list(batch_sampler(examples, batch_size, shuffle_seed=seed))[:steps]
    else:
        perm = np.random.default_rng(seed).permutation(len(examples))
        order = [perm[i * batch_size:(i + 1) * batch_size].tolist() for i in range(steps)]
    return [collate_batch(examples, rows, rows, model, torch.device("cpu")) for rows in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the MELD folder")
    p.add_argument("--recipe", default="meld-text-base", choices=[n for n, r in RECIPES.items() if r.stage == 1])
    p.add_argument("--classes", type=int, default=7, choices=(4, 7))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")

    set_threads(args.threads)
    recipe = RECIPES[args.recipe]
    corpus = load_corpus(f"meld:{args.data}:{args.classes}")
    cfg = preset(recipe.preset, labels=corpus.labels)
    cfg.former.num_queries, cfg.former.max_text_tokens = recipe.num_queries, recipe.max_text_tokens
    weights = class_weights_from_labels([e.label for e in corpus.train], len(corpus.labels),
                                        recipe.train.class_weighting)
    variants = {}
    for bf16 in (False, True):
        for bucketed in (True, False):
            seed_everything(recipe.train.seed)
            model = EmoQStage1(cfg)
            model.train()
            train = dataclasses.replace(recipe.train, bf16=bf16)
            name = f"{'bf16' if bf16 else 'fp32'}, {'bucketed' if bucketed else 'plain'}"
            variants[name] = {"model": model, "train": train, "optimizer": make_optimizer(model, train),
                              "batches": batches(corpus.train, model, train.batch_size, args.steps, bucketed,
                                                 recipe.train.seed), "seconds": []}
    for step in range(args.steps):
        for v in variants.values():
            batch = v["batches"][step]
            start = time.perf_counter()
            loss = stage1_loss(v["model"], batch, weights, v["train"])
            v["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(v["model"].parameters(), v["train"].grad_clip)
            v["optimizer"].step()
            if step >= args.warmup:
                v["seconds"].append(time.perf_counter() - start)

    rows = {}
    reference = None
    for name, v in variants.items():
        masks = [b["text_mask"] for b in v["batches"][args.warmup:]]
        median = statistics.median(v["seconds"])
        reference = reference or median
        rows[name] = {"step_s_median": round(median, 3), "step_s_min": round(min(v["seconds"]), 3),
                      "step_s_max": round(max(v["seconds"]), 3), "vs_fp32_bucketed": round(median / reference, 3),
                      "text_padding": round(1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks), 3)}
        print(f"{name:16s} step {median:6.2f} s [{min(v['seconds']):.2f}-{max(v['seconds']):.2f}]  "
              f"{median / reference:4.2f}x fp32 bucketed  padding {rows[name]['text_padding']:.2f}")
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python -m benchmarks.meld_step_time " + " ".join(argv if argv is not None else sys.argv[1:]),
            "recipe": args.recipe, "classes": args.classes, "batch_size": recipe.train.batch_size,
            "timed_steps": args.steps - args.warmup, "threads": args.threads, "cpu_class": cpu_class(),
            "torch": torch.__version__, "variants": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
