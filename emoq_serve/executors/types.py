"""The values that cross the runtime boundary: what the server hands in, what comes back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from emoq_serve.data.types import Turn

#: Pipeline stages reported in every result's timing breakdown, in order.
STAGES = ("queue", "audio_encoder", "former", "pooling", "llm")


@dataclass
class Utterance:
    """One request after validation and decoding: mono float32 audio at 16 kHz."""

    audio: np.ndarray
    transcript: str = ""
    speaker: str | None = None
    #: Earlier turns of the conversation, oldest first: (speaker or None, transcript). A model
    #: trained with dialogue context reads the last `context_turns` of them.
    context: tuple[Turn, ...] = ()


@dataclass
class Prediction:
    """Posteriors over the bundle's labels (same order) and per-stage milliseconds."""

    label: str
    probabilities: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


class EngineFailure(RuntimeError):
    """The engine itself broke (e.g. the vLLM engine thread failed): every request on it fails
    and only a rebuild helps, so the supervisor answers UNAVAILABLE and rebuilds it."""


class EngineUnavailable(Exception):
    """No engine can take the batch right now: the local engine failed fatally or is being
    rebuilt, or no cluster replica is ready (UNAVAILABLE: retry shortly or elsewhere)."""


class Recognizer(Protocol):
    """A batch-in, batch-out engine (ONNX+vLLM pipeline, or the eager baseline). Optional
    capabilities are the `Supports*` protocols below, checked with `isinstance`."""

    labels: tuple[str, ...]

    def info(self) -> dict[str, str]:
        """Bundle id, preset and library versions for GetModelInfo."""
        ...

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        """Run one batch; result i belongs to utterance i."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class SupportsFailureWatch(Protocol):
    """An engine that can break by itself between batches (a background engine thread): it calls
    `callback(EngineFailure)` once, from any thread, when it breaks, so the supervisor can rebuild
    it before the next request finds it broken."""

    def watch_failure(self, callback: Callable[[BaseException], None]) -> None: ...


@runtime_checkable
class SupportsServingState(Protocol):
    """An engine whose availability changes while it runs (`EngineSupervisor`, the cluster engine):
    `serving` now, and an assignable `on_state`, awaited with the new state on every change (the
    server mirrors it in gRPC health)."""

    serving: bool
    on_state: Callable[[bool], Awaitable[None]] | None


@runtime_checkable
class SupportsMetrics(Protocol):
    """An engine with its own Prometheus series (the cluster engine's per replica), registered on
    the server's registry so that one endpoint serves them all."""

    def bind_metrics(self, registry: Any) -> None: ...
