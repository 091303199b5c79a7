"""`python -m benchmarks.gpu_eager_parity CHECKPOINT OUT.json`: a stage-2 checkpoint's posteriors on
CUDA (fp32 and bf16 autocast) against the same checkpoint on the CPU, over the synthetic corpus's
dev split; writes the max abs differences. Exits 1 beyond the tolerances (fp32 1e-4, bf16 5e-2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TOLERANCES = {"float32": 1e-4, "bfloat16": 5e-2}


def main(argv: list[str] | None = None) -> int:
    from emoq_serve.data import load_corpus
    from emoq_serve.model.stage2 import EmoQStage2
    from training.stage2 import predict

    checkpoint, out = (sys.argv[1:] if argv is None else argv)[:2]
    examples = load_corpus("synthetic:8", seed=0).dev
    cpu = predict(EmoQStage2.load(checkpoint), examples, batch_size=8)
    report: dict = {"checkpoint": checkpoint, "examples": len(examples), "tolerances": TOLERANCES, "max_abs": {}}
    device = "cuda" if torch.cuda.is_available() else None
    if device is None:
        report["skipped"] = "torch sees no CUDA GPU"
    else:
        model = EmoQStage2.load(checkpoint).to(device)
        for dtype, bf16 in (("float32", False), ("bfloat16", True)):
            report["max_abs"][dtype] = float(abs(predict(model, examples, 8, bf16=bf16) - cpu).max())
        report["device_name"] = torch.cuda.get_device_name()
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if all(report["max_abs"][k] <= TOLERANCES[k] for k in report["max_abs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
