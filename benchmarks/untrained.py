"""An untrained stage-2 checkpoint of a preset, for benchmarking: the speed of a model does not
depend on what it learned, so the benchmark bundle skips hours of CPU training.

Everything is random (seeded) except what the preset initialises from a real checkpoint — for
`base`, the former's embeddings, self-attention and FFN come from all-MiniLM-L6-v2 — so the
compute graph, shapes and numerics (no all-zero layers) are those of a trained model.

Run: `python -m benchmarks.untrained --preset base --out runs/base_ckpt`, then
`emoq export --checkpoint runs/base_ckpt/checkpoint --out runs/base_bundle`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.workload import conversational_lines
from emoq_serve.config import PRESETS, preset


def build_untrained_checkpoint(preset_name: str, out: Path, seed: int = 0) -> Path:
    """Save an untrained `EmoQStage2` of `preset_name` to `out` (its LLM tokenizer is trained on
    the benchmark's conversational lines plus the emotion words) and return `out`."""
    from emoq_serve.model.emoq import EmoQStage1
    from emoq_serve.model.llm import build_or_load_tokenizer
    from emoq_serve.model.prompt import resolve_emotion_words
    from emoq_serve.model.stage2 import EmoQStage2

    cfg = preset(preset_name)
    torch.manual_seed(seed)
    stage1 = EmoQStage1(cfg)  # random HuBERT, former initialised per cfg.former.text_init
    words = list(resolve_emotion_words(cfg.labels, cfg.llm.emotion_words).values())
    llm_tokenizer = build_or_load_tokenizer(cfg.llm, words, conversational_lines() * 20, out / "llm_tokenizer_src")
    model = EmoQStage2.build(cfg, stage1.audio_encoder, stage1.former, stage1.text_tokenizer, llm_tokenizer, seed=seed)
    model.save(out / "checkpoint")
    return out / "checkpoint"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_untrained_checkpoint(args.preset, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
