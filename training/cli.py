"""`emoq train stage1|stage2`: both parsers live here; each command imports its trainer lazily
(every `emoq` invocation builds all parsers, so no torch import at registration time)."""

from __future__ import annotations

import argparse

from emoq_serve.config import PRESETS


def _add_common(p: argparse.ArgumentParser, resume: bool = True) -> None:
    """Flags both stages share; None means "the preset's default" (see STAGE1_DEFAULTS)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size preset")
    p.add_argument("--data", default="synthetic", help="synthetic[:N] | iemocap:DIR[:fold] | meld:DIR[:4|7]")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.jsonl, summary.json)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of the parts the preset gives no rate of their own "
                   "(its lr_groups: the fresh former parts, aux head, projector, LoRA keep theirs)")
    p.add_argument("--seed", type=int)
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--select-metric", choices=["wa", "ua", "uar", "wf1"], help="dev metric choosing the best checkpoint")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="where the model and batches live (default auto: CUDA when torch sees a GPU, else CPU)")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast on the chosen device (CUDA, or CPUs with AVX512-BF16/AMX); weights stay fp32")


def _run_stage1(args: argparse.Namespace) -> int:
    from training.stage1 import run

    return run(args)


def _run_stage2(args: argparse.Namespace) -> int:
    from training.stage2 import run

    return run(args)


def _run_loso(args: argparse.Namespace) -> int:
    from training.loso import run

    return run(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a checkpoint (stage1: former + MAL; stage2: LLM + LoRA)")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")

    stage1 = stages.add_parser("stage1", help="EmoQ-Former + auxiliary head with the MAL loss")
    _add_common(stage1)
    stage1.add_argument("--feature-cache", help="folder caching frozen HuBERT features across epochs and runs")
    stage1.set_defaults(func=_run_stage1)

    stage2 = stages.add_parser("stage2", help="projector + LoRA LLM on top of a stage-1 checkpoint")
    _add_common(stage2)
    source = stage2.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-stage1", "--stage1", dest="from_stage1", metavar="DIR",
                        help="stage-1 run or checkpoint folder (runs/stage1 or runs/stage1/best)")
    source.add_argument("--end-to-end", action="store_true", help="no stage-1 pre-training: fresh former (ablation)")
    stage2.add_argument("--modality", choices=["both", "audio", "text"], default="both", help="modality ablation")
    stage2.add_argument("--no-former", action="store_true", help="inject mean-pooled raw audio features (ablation)")
    stage2.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations in backward")
    stage2.add_argument("--feature-cache", help="folder caching frozen HuBERT features across epochs and runs")
    stage2.add_argument("--llm-preset", choices=sorted(PRESETS),
                        help="take the LLM of this preset (e.g. smollm2) instead of the stage-1 checkpoint's preset's")
    stage2.add_argument("--zero-shot", action="store_true",
                        help="first score the untrained LLM on dev from the transcript alone (the zero-shot baseline)")
    stage2.set_defaults(func=_run_stage2)

    loso = stages.add_parser("loso", help="IEMOCAP's five leave-one-session-out folds in turn, mean ± std of WA/UA/WF1")
    _add_common(loso, resume=False)  # a finished fold (OUT/foldK/fold.json) is read back instead
    loso.add_argument("--stages", type=int, choices=(1, 2), default=2,
                      help="1: the former's auxiliary head; 2: stage 2 on it too (the paper's model)")
    loso.add_argument("--folds", type=int, nargs="+", choices=range(1, 6), default=list(range(1, 6)), metavar="K",
                      help="test sessions to run (default all five)")
    loso.add_argument("--feature-cache", help="folder caching frozen HuBERT features across epochs and folds")
    loso.set_defaults(func=_run_loso)
