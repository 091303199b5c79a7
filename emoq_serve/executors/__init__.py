"""Runtime engines: everything between a decoded batch of utterances and the posteriors.

`load_recognizer` is the one entry point the server needs; `OnnxPipeline` (ORT + vLLM or
transformers) and `EagerPipeline` (the PyTorch baseline) both implement `types.Recognizer`.
Engine modules import torch, onnxruntime and vLLM, so they load only when asked for.

Modules: `types` (Utterance, Prediction, Recognizer and its optional capabilities), `config`
(RuntimeConfig and its presets), `pipeline` (OnnxPipeline) over `ort` / `openvino` (the ONNX
graphs) and `llm_backends` (vLLM, transformers), `eager` (the PyTorch baseline), and what both
engines share: `inputs` (the model's input batch), `heads` (projector or auxiliary head, prompt
embeddings), `common` (device, stage timing, model info, predictions), `threads` (compute threads named and
single-threaded), and `cpu_plans.json` (the `cpu` preset's layout per CPU class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.types import Recognizer

EngineName = Literal["onnx", "eager"]


def load_recognizer(bundle_path: str | Path, cfg: RuntimeConfig, engine: EngineName = "onnx") -> Recognizer:
    """Open (and by default hash-verify) a bundle and start the named engine on it."""
    from emoq_serve.bundle import Bundle

    bundle = Bundle.open(bundle_path, verify_hashes=cfg.verify_hashes)
    if engine == "onnx":
        from emoq_serve.executors.pipeline import OnnxPipeline

        return OnnxPipeline(bundle, cfg)
    if engine == "eager":
        from emoq_serve.executors.eager import EagerPipeline

        return EagerPipeline(bundle, cfg)
    raise ValueError(f"unknown engine {engine!r}; expected 'onnx' or 'eager'")


async def warm_up(recognizer: Recognizer) -> None:
    """Run one short utterance through the engine before it takes traffic.

    The first call pays one-off costs (ORT kernel selection, vLLM's first step, lazy imports):
    seconds instead of milliseconds, which would otherwise land on the first real request.
    """
    import numpy as np

    from emoq_serve.config import SAMPLE_RATE
    from emoq_serve.executors.types import Utterance

    await recognizer.recognize([Utterance(np.zeros(SAMPLE_RATE, dtype=np.float32), "warm up")])
