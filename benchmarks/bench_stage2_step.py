"""Stage-2 training step cost with SmolLM2-135M-Instruct: fp32 against bf16 autocast, and the
answer-only logits training uses against logits at every position.

Run: `python -m benchmarks.bench_stage2_step [--batch 8] [--steps 6] [--threads 2]`.

One step = forward, loss, backward and AdamW update of a text-only (MELD-shaped) batch: the
`meld-text-llm` recipe's model (MiniLM former, projector, LoRA r8 on every linear layer of the
LLM). `kept` is what training computes (`EmoQStage2.loss`: logits only at the answer positions,
`logits_to_keep`); `all` is `loss(all_positions=True)`, which projects every position onto the
49k-word vocabulary, the plain causal-LM way. Variants take turns step by step; medians over
`--steps` steps each after two warm-up rounds; ratios against fp32 `kept` in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from emoq_serve.hostinfo import simd_flags
from benchmarks.report import library_versions, machine_description
from emoq_serve.config import LABEL_SETS, TrainConfig, preset
from emoq_serve.data.types import Corpus, Example
from training import stage1
from training.common import autocast, make_optimizer
from training.stage2 import Stage2Options, build_model

RESULTS_DIR = Path(__file__).parent / "results"
WARMUP = 2

#: MELD-like turns (MELD's median transcript is about 8 words; these span 3 to 25).
LINES = [
    "Oh my God, you guys, I can't believe he actually said that to her face!",
    "Okay.",
    "Well, I guess we could try going to the coffee house later, if you want to.",
    "No, no, no, you don't understand, that's the whole point of the thing I was telling you about yesterday.",
    "That's great news, congratulations!",
    "I'm fine, really, don't worry about it.",
    "What are you doing here?",
    "Ugh, that is disgusting, get it away from me.",
]


def batch_examples(n: int) -> list[Example]:
    return [Example(f"b{i}", None, LINES[i % len(LINES)], i % 7, speaker="Ross") for i in range(n)]


def run(batch_size: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = preset("smollm2", labels=LABEL_SETS["meld7"])
    examples = batch_examples(batch_size)
    corpus = Corpus(cfg.labels, examples, examples, [])
    model, _ = build_model(cfg, corpus, Stage2Options(modality="text"), seed=0)
    model.train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    batch = next(iter(stage1.iterate_batches(examples, model, batch_size, shuffle_seed=0)))
    prompt_tokens = model.prompt_inputs(batch["transcripts"], batch["speakers"])["input_ids"].shape[1]
    loss_fns = {"kept": lambda: model.loss(batch), "all": lambda: model.loss(batch, all_positions=True)}
    with torch.no_grad():
        same = abs(loss_fns["kept"]().item() - loss_fns["all"]().item())
    variants = [(bf16, logits) for bf16 in (False, True) for logits in ("kept", "all")]
    times: dict[tuple[bool, str], list[float]] = {v: [] for v in variants}
    for i in range(steps + WARMUP):  # variants interleaved, so a drifting machine affects all alike
        for bf16, logits in variants:
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), bf16):
                loss = loss_fns[logits]()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= WARMUP:
                times[bf16, logits].append(time.perf_counter() - t0)
    points = [{"dtype": "bf16" if bf16 else "fp32", "logits": logits, "median_s": statistics.median(times[bf16, logits]),
               "times_s": times[bf16, logits]} for bf16, logits in variants]
    for p in points:
        print(f"{p['dtype']} {p['logits']}: {p['median_s']:.2f} s/step", flush=True)
    base = points[0]["median_s"]
    for p in points:
        p["ratio_vs_fp32_kept"] = p["median_s"] / base
    return {
        "benchmark": "stage2_step", "command": f"python -m benchmarks.bench_stage2_step --batch {batch_size} "
                                               f"--steps {steps} --threads {threads}",
        "machine": machine_description(), "cpu_flags": simd_flags(), "threads": threads, "versions": library_versions(),
        "batch": batch_size, "padded_prompt_tokens": prompt_tokens,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss_kept_vs_all_abs_diff_fp32": same, "points": points,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "stage2_step_cpu.json")
    args = p.parse_args(argv)
    result = run(args.batch, args.steps, args.threads)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
