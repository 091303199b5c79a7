"""What the MPNet-base former costs against the MiniLM-L6 one (issue 28), on this CPU.

Per training step: the former + a linear head, AdamW, cross-entropy on z, batch 16 x 40 text
tokens with 16 queries cross-attending to 150 audio frames (3 s of the `small` encoder's 128-wide
frames), fp32 and bf16 autocast (weights stay fp32, as `TrainConfig.bf16`). Per served utterance:
the former's forward alone (eager PyTorch, no grad) on one utterance of 20 tokens and 150 frames,
fp32 and bf16 autocast. Both formers carry their real pretrained weights. Median of the timed
repeats after one warm-up.

    .venv/bin/python -m benchmarks.mpnet_former_cost --threads 2 --out benchmarks/results/mpnet_former.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from emoq_serve.config import FormerConfig, mpnet_former, preset
from emoq_serve.hostinfo import cpu_has_native_bf16, cpu_model, library_versions, simd_flags
from emoq_serve.model.former import EmoQFormer, load_text_tokenizer
from emoq_serve.model.text_init import init_from_pretrained

AUDIO_DIM, FRAMES = 128, 150


def _former(cfg: FormerConfig) -> EmoQFormer:
    tok = load_text_tokenizer(cfg)
    former = EmoQFormer(cfg, AUDIO_DIM, len(tok))
    init_from_pretrained(former, cfg.text_init)
    return former


def _inputs(former: EmoQFormer, batch: int, tokens: int):
    vocab = former.embeddings.word.num_embeddings
    return (torch.randn(batch, FRAMES, AUDIO_DIM), torch.ones(batch, FRAMES, dtype=torch.bool),
            torch.randint(5, vocab, (batch, tokens)), torch.ones(batch, tokens, dtype=torch.bool))


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step_s(former: EmoQFormer, bf16: bool, repeats: int) -> float:
    head = nn.Linear(former.cfg.hidden_size, 7)
    opt = torch.optim.AdamW([*former.parameters(), *head.parameters()], lr=1e-5)
    args = _inputs(former, 16, 40)
    labels = torch.randint(0, 7, (16,))
    former.train()

    def step() -> None:
        with _autocast(bf16):
            loss = nn.functional.cross_entropy(head(former.embed(*args)).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _median(step, repeats)


@torch.no_grad()
def forward_s(former: EmoQFormer, bf16: bool, repeats: int) -> float:
    args = _inputs(former, 1, 20)
    former.eval()

    def run() -> None:
        with _autocast(bf16):
            former.embed(*args)

    return _median(run, repeats)


def onnx_forward_ms(former: EmoQFormer, threads: int, repeats: int) -> float:
    """The served path's former: `former.onnx` (as `emoq export` writes it) in onnxruntime's CPU EP,
    fp32, all graph optimisations, one utterance."""
    import tempfile

    import onnxruntime as ort

    from export.onnx_export import export_former

    with tempfile.TemporaryDirectory() as tmp:
        path = export_former(former.eval(), AUDIO_DIM, Path(tmp) / "former.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = dict(zip(("frames", "frame_mask", "input_ids", "text_mask"), (t.numpy() for t in _inputs(former, 1, 20))))
        return 1000 * _median(lambda: session.run(None, feed), repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=3)
    p.add_argument("--forward-repeats", type=int, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--onnx-only", action="store_true", help="only time the exported former.onnx per utterance")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    formers = {"minilm_l6": preset("small").former, "mpnet_base": mpnet_former()}
    results = {}
    for name, cfg in formers.items():
        torch.manual_seed(0)
        former = _former(cfg)
        row = {"parameters": sum(p.numel() for p in former.parameters()),
               "layers": cfg.num_layers, "hidden": cfg.hidden_size, "queries": cfg.num_queries}
        for precision, bf16 in (("fp32", False), ("bf16", True)) if not args.onnx_only else ():
            row[f"train_step_s_{precision}"] = round(train_step_s(former, bf16, args.train_repeats), 4)
            row[f"forward_ms_{precision}"] = round(1000 * forward_s(former, bf16, args.forward_repeats), 2)
        row["forward_ms_onnx_fp32"] = round(onnx_forward_ms(former, args.threads, args.forward_repeats), 2)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    report = {
        "what": "EmoQ-Former cost, MiniLM-L6 vs MPNet-base init (eager PyTorch on CPU)",
        "command": "python -m benchmarks.mpnet_former_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_step": "batch 16 x 40 tokens, 16 queries, 150 audio frames x 128, former + linear head, AdamW; "
                      f"median of {args.train_repeats} after one warm-up",
        "forward": f"one utterance, 20 tokens, 150 frames, no grad; median of {args.forward_repeats} after one warm-up",
        "bf16": "torch.autocast('cpu', bfloat16), weights fp32",
        "results": results,
        "host": {"cpu": cpu_model(), "simd_flags": simd_flags(), "native_bf16": cpu_has_native_bf16(),
                 "cores": os.cpu_count(), "threads": args.threads,
                 "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "versions": library_versions("torch", "transformers"),
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
