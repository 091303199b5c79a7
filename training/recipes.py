"""Named, reproducible training recipes: one command per published result.

    python -m training.recipes meld-text --data ../shared/data/meld --classes 7 --out runs/meld_text7
    python -m training.recipes meld-text-context --data ../shared/data/meld --classes 7 --out runs/meld_ctx7
    python -m training.recipes meld-text-llm --data ../shared/data/meld --classes 7 \
        --from-stage1 runs/meld_text7 --out runs/meld_text7_llm
    python -m training.recipes meld-text-base --data ../shared/data/meld --classes 7 --out runs/meld_base7
    python -m training.recipes meld-text-base-llm --data ../shared/data/meld --classes 7 \
        --from-stage1 runs/meld_base7 --out runs/meld_base7_llm

`meld-text` is the paper's "text" ablation row on MELD: the stage-1 EmoQ-Former initialised from
all-MiniLM-L6-v2, trained with MAL (SupCon + class-weighted focal, weights from the training
split), no audio (MELD here has transcripts only, so every example is text-only and the former
cross-attends to its null frame). The dev split selects the checkpoint (by WF1) and chose the
settings (benchmarks/results/meld_text.md); nothing is tuned on test. The text-only former needs
few queries (they only summarise the transcript for pooling). `meld-text-context` is the same
with dialogue context: the former also reads the previous turn of the dialogue and its speaker.

`train_fraction` trains on a class-stratified, seeded subset (budget studies); the flags override
one setting at a time (class weighting, SupCon temperature, epochs, context turns, ...).
`meld-text-llm` is the paper's text-only row as a stage-2 run: the `meld-text` former (stage 1)
feeds a soft prompt to SmolLM2-135M-Instruct, LoRA-tuned, and the untrained LLM is scored first on
the same dev examples from the transcript alone (the zero-shot baseline the tuned model must
beat). A 135 M LLM step costs seconds on two cores, so it trains on a stratified subset and
evaluates on a stratified dev subset (`dev_fraction`).

`meld-text-base` and `meld-text-base-llm` are the same two stages on the MPNet-base former (the
`mpnet` preset, issue 29): the pretrained body at the base-size fine-tuning rate, bf16 autocast.
The stage-2 recipes give text-only checkpoints, which `emoq export` turns into text-only bundles.

Everything that defines the run is in the `Recipe` below and is written to the run's summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emoq_serve.config import TrainConfig
from emoq_serve.data.types import Corpus
from emoq_serve.model.losses import CLASS_WEIGHTING
from training.common import PARAM_GROUPS
from training.distributed import launched_rank


@dataclass
class Recipe:
    """A run: stage, preset (stage 2: the preset whose LLM goes on the stage-1 former), former
    overrides (stage 1; stage 2 takes its stage-1 checkpoint's), train/dev fractions and
    optimisation settings."""

    preset: str
    train_fraction: float
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: int = 1
    num_queries: int | None = None
    max_text_tokens: int | None = None
    #: Dialogue context: earlier turns the former reads (`FormerConfig.context_turns`).
    context_turns: int = 0
    dev_fraction: float = 1.0


#: The MELD text study's choice on dev (benchmarks/results/meld_text.md): square-root class
#: weights and SupCon at 0.3 screened best on one epoch; four epochs, dev WF1 picks the epoch.
MELD_TEXT_TRAIN = TrainConfig(epochs=4, batch_size=16, lr=1e-4, lr_groups={PARAM_GROUPS["aux_head"]: 2e-3},
                              focal_gamma=2.0, class_weighting="sqrt", supcon_temperature=0.3, select_metric="wf1",
                              seed=0, threads=1)

#: The same loss settings on the MPNet-base former (issue 29): a base-size pretrained body wants a
#: smaller step than MiniLM-L6 (the usual 2e-5..5e-5 fine-tuning range), the fresh parts and the
#: head keep theirs; bf16 autocast because an fp32 MPNet epoch is ~2x slower on these CPUs.
MELD_TEXT_BASE_TRAIN = dataclasses.replace(
    MELD_TEXT_TRAIN, epochs=3, lr=3e-5, bf16=True,
    lr_groups={PARAM_GROUPS["aux_head"]: 2e-3, PARAM_GROUPS["former_fresh"]: 1e-4})

#: `meld-text-llm`'s run: SmolLM2 with LoRA on a stage-1 former, 10 % of train, 25 % of dev.
MELD_TEXT_LLM_TRAIN = TrainConfig(epochs=1, batch_size=8, lr=5e-5, warmup_ratio=0.1, select_metric="wf1", seed=0,
                                  threads=2, lr_groups={PARAM_GROUPS["projector"]: 1e-3, PARAM_GROUPS["lora"]: 1e-3,
                                                        PARAM_GROUPS["former_fresh"]: 5e-4})
#: The same on the MPNet-base former: its pretrained body at meld-text-base's rate (the projector,
#: LoRA and the former's fresh parts keep theirs), and bf16 autocast for the base-size former.
MELD_TEXT_BASE_LLM_TRAIN = dataclasses.replace(MELD_TEXT_LLM_TRAIN, lr=MELD_TEXT_BASE_TRAIN.lr, bf16=True)

RECIPES: dict[str, Recipe] = {
    "meld-text": Recipe(
        preset="small", num_queries=4, max_text_tokens=48, train_fraction=1.0, train=MELD_TEXT_TRAIN,
    ),
    "meld-text-context": Recipe(
        preset="small", num_queries=4, max_text_tokens=96, context_turns=1, train_fraction=1.0, train=MELD_TEXT_TRAIN,
    ),
    "meld-text-base": Recipe(
        preset="mpnet", num_queries=4, max_text_tokens=48, train_fraction=1.0, train=MELD_TEXT_BASE_TRAIN,
    ),
    "meld-text-llm": Recipe(
        preset="smollm2", stage=2, train_fraction=0.1, dev_fraction=0.25, train=MELD_TEXT_LLM_TRAIN,
    ),
    "meld-text-base-llm": Recipe(
        preset="smollm2", stage=2, train_fraction=0.1, dev_fraction=0.25, train=MELD_TEXT_BASE_LLM_TRAIN,
    ),
}


def stratified_subset(corpus: Corpus, fraction: float, seed: int, split: str = "train") -> Corpus:
    """The corpus with `fraction` of each class of `split` kept (seeded), the other splits untouched:
    the class balance (and hence the focal loss' class weights, or the dev metrics' mix) stays the
    full split's."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{split}_fraction must be in (0, 1]; got {fraction}")
    if fraction == 1.0:
        return corpus
    examples = getattr(corpus, split)
    rng = np.random.default_rng(seed)
    labels = np.array([e.label for e in examples])
    keep = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[: max(1, round(fraction * int((labels == c).sum())))]
        for c in np.unique(labels)
    ])
    return dataclasses.replace(corpus, **{split: [examples[i] for i in np.sort(keep)]})


def run_recipe(name: str, data_dir: str, classes: int, out_dir: str | Path, train_fraction: float | None = None,
               from_stage1: str | None = None, dev_fraction: float | None = None, context_turns: int | None = None,
               **overrides: Any) -> dict[str, Any]:
    """Train recipe `name` on MELD (`classes` 4 or 7); `train_fraction`, `dev_fraction` and
    `overrides` (TrainConfig fields) replace the recipe's values, so a budget study changes one
    thing and nothing else. A stage-2 recipe starts from the stage-1 run `from_stage1`."""
    from emoq_serve.config import preset
    from emoq_serve.data import load_corpus

    recipe = RECIPES[name]
    recipe = dataclasses.replace(recipe, **{k: v for k, v in (("train_fraction", train_fraction),
                                                             ("dev_fraction", dev_fraction),
                                                             ("context_turns", context_turns)) if v is not None})
    train_cfg = dataclasses.replace(recipe.train, **{k: v for k, v in overrides.items() if v is not None})
    corpus = stratified_subset(load_corpus(f"meld:{data_dir}:{classes}"), recipe.train_fraction, train_cfg.seed)
    corpus = stratified_subset(corpus, recipe.dev_fraction, train_cfg.seed, split="dev")
    model_cfg = preset(recipe.preset, labels=corpus.labels)
    if recipe.stage == 1:
        from training.stage1 import train_stage1

        model_cfg.former.num_queries = recipe.num_queries
        model_cfg.former.max_text_tokens = recipe.max_text_tokens
        model_cfg.former.context_turns = recipe.context_turns
        summary = train_stage1(model_cfg, train_cfg, corpus, out_dir)
    else:
        from training.stage2 import Stage2Options, train_stage2

        if not from_stage1:
            raise ValueError(f"recipe {name} is a stage-2 run: pass the stage-1 run it starts from (--from-stage1)")
        opts = Stage2Options(stage1_dir=from_stage1, modality="text", llm_preset=recipe.preset, zero_shot=True)
        summary = train_stage2(model_cfg, train_cfg, corpus, out_dir, opts)
    summary["recipe"] = {"name": name, "classes": classes, "train_examples": len(corpus.train),
                         "dev_examples": len(corpus.dev), "from_stage1": from_stage1,
                         **dataclasses.asdict(dataclasses.replace(recipe, train=train_cfg))}
    if not launched_rank():  # under torchrun, rank 0 writes (as the trainer does)
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--data", required=True, help="MELD folder (train_sent_emo.csv, dev_sent_emo.csv)")
    p.add_argument("--classes", type=int, choices=[4, 7], required=True)
    p.add_argument("--out", required=True, help="run folder (best/, last/, log.jsonl, summary.json)")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--train-fraction", type=float, help="override the recipe's stratified train fraction")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--dev-fraction", type=float, help="override the recipe's stratified dev fraction")
    p.add_argument("--from-stage1", metavar="DIR", help="stage-2 recipes: the stage-1 run they start from")
    p.add_argument("--context-turns", type=int, help="override the recipe's dialogue context (earlier turns read)")
    p.add_argument("--class-weighting", choices=CLASS_WEIGHTING, help="override the focal term's class weights")
    p.add_argument("--supcon-temperature", type=float, help="override the SupCon temperature")
    p.add_argument("--threads", type=int, help="override the recipe's torch threads")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (CPUs with AVX512-BF16/AMX)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_recipe(args.recipe, args.data, args.classes, args.out, args.train_fraction, args.from_stage1,
                         args.dev_fraction, args.context_turns, seed=args.seed, epochs=args.epochs, lr=args.lr,
                         class_weighting=args.class_weighting, supcon_temperature=args.supcon_temperature,
                         threads=args.threads, bf16=args.bf16)
    if launched_rank():
        return 0
    best = summary["best_dev"]
    print(f"{args.recipe} {args.classes}-class: dev WA {best['wa']:.4f} UA {best['ua']:.4f} WF1 {best['wf1']:.4f}"
          f" ({summary['seconds']:.0f} s)")
    for key, what in (("zero_shot_dev", "zero-shot LLM"), ("stage1_dev", "stage-1 head")):
        if key in summary:
            m = summary[key]
            print(f"  {what} on the same dev examples: WA {m['wa']:.4f} UA {m['ua']:.4f} WF1 {m['wf1']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
