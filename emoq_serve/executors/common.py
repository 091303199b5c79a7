"""What both engines do around the model: refuse a bundle they cannot serve and pick the device,
time each stage, describe themselves for GetModelInfo, and hand back one `Prediction` per row."""

from __future__ import annotations

import time

import numpy as np
import torch

from emoq_serve.bundle import Bundle, BundleError
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.types import Prediction
from emoq_serve.hostinfo import library_versions


def engine_device(bundle: Bundle, cfg: RuntimeConfig, engine: str) -> torch.device:
    """What both engines do first: refuse models they cannot serve (before loading anything
    heavy), set the torch thread count, and resolve the device."""
    if not bundle.model_config.llm.use_former:
        raise BundleError(f"this bundle's model has no former (use_former=False); the {engine} engine serves "
                          "former-based models only")
    torch.set_num_threads(cfg.torch_threads)
    return torch.device(cfg.resolved_device())


class StageClock:
    """Milliseconds per pipeline stage: `lap(stage)` closes the stage that just ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = (now - self._clock) * 1e3
        self._clock = now


def engine_info(bundle: Bundle, engine: str, llm_backend: str, device: str, dtype: str,
                packages: tuple[str, ...]) -> dict[str, str]:
    """GetModelInfo's fields for an engine: bundle identity, how it runs, library versions."""
    return {
        "bundle_id": bundle.bundle_id,
        "preset": bundle.model_config.preset,
        "engine": engine,
        "llm_backend": llm_backend,
        "device": device,
        "dtype": dtype,
        # The earlier turns the model reads (the server keeps that many per conversation stream).
        "context_turns": str(bundle.model_config.former.context_turns),
        # "both" or "text": a text-only model answers from the transcript alone (the server then
        # refuses a call that ends up without one).
        "modality": bundle.modality,
        **library_versions("emoq-serve", *packages),
    }


def predictions(labels: tuple[str, ...], posteriors: np.ndarray, timings_ms: dict[str, float]) -> list[Prediction]:
    """One `Prediction` per row; every row of a batch carries the batch's stage timings."""
    return [Prediction(labels[int(np.argmax(p))], p, dict(timings_ms)) for p in posteriors]
