"""`EngineReplica`, the Ray Serve deployment: the local engine behind its own batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from emoq_serve.executors import EngineName, load_recognizer, warm_up
from emoq_serve.engine.batcher import BatcherConfig, DynamicBatcher
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.types import EngineFailure, Prediction, SupportsFailureWatch, Utterance

log = logging.getLogger(__name__)



@dataclass
class ReplicaReply:
    """A replica's answer to one batch: which replica (and node) computed it, and the predictions."""

    replica: str
    node: str
    predictions: list[Prediction]


class EngineReplica:
    """The Ray Serve deployment class: one engine on the bundle, behind its own dynamic batcher."""

    async def __init__(self, bundle_path: str, runtime: RuntimeConfig, engine: EngineName, batcher: BatcherConfig):
        import ray
        from ray import serve

        self.replica = serve.get_replica_context().replica_tag
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self._broken: BaseException | None = None
        # Off the replica's loop: loading checks every file's sha256 and starts the LLM engine.
        self.engine = await asyncio.to_thread(load_recognizer, bundle_path, runtime, engine)
        if isinstance(self.engine, SupportsFailureWatch):
            self.engine.watch_failure(self._failed)
        await warm_up(self.engine)  # before Ray marks the replica RUNNING and routes to it
        self.batcher = DynamicBatcher(self.engine, batcher)
        self.batcher.start()
        log.info("engine replica %s on node %s ready", self.replica, self.node)

    def _failed(self, exc: BaseException) -> None:
        """The engine reported itself broken (any thread): fail the health check from now on."""
        self._broken = exc

    def describe(self) -> dict[str, Any]:
        return {"labels": list(self.engine.labels), "info": self.engine.info(), "replica": self.replica,
                "node": self.node}

    async def recognize(self, batch: list[Utterance]) -> ReplicaReply:
        if self._broken is not None:
            raise EngineFailure(f"replica {self.replica}'s engine broke: {self._broken}")
        # Ray hands numpy arrays over read-only (zero-copy): give the engine writable audio.
        batch = [dataclasses.replace(u, audio=np.require(u.audio, requirements="W")) for u in batch]
        predictions = await asyncio.gather(*(self.batcher.submit(u) for u in batch))
        return ReplicaReply(self.replica, self.node, list(predictions))

    def check_health(self) -> None:
        """Ray calls this every `health_check_period_s`; raising makes it replace the replica."""
        if self._broken is not None:
            raise RuntimeError(f"the engine broke: {type(self._broken).__name__}: {self._broken}")

    async def __del__(self) -> None:  # Ray Serve awaits this when it stops the replica
        await self.batcher.close(timeout=5.0)
        await self.engine.close()
