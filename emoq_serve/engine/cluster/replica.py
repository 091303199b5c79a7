"""`EngineReplica`, the Ray Serve deployment: the local engine, supervised, behind its own batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from emoq_serve.engine.batcher import BatcherConfig, DynamicBatcher
from emoq_serve.engine.faults import inject_faults
from emoq_serve.engine.supervisor import EngineSupervisor, SupervisorConfig
from emoq_serve.executors import EngineName, load_recognizer, warm_up
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.types import Prediction, Utterance

log = logging.getLogger(__name__)


@dataclass
class ReplicaReply:
    """A replica's answer to one batch: which replica (and node) computed it, and the predictions."""

    replica: str
    node: str
    predictions: list[Prediction]


class EngineReplica:
    """The Ray Serve deployment class: one engine on the bundle under an `EngineSupervisor` (as
    `emoq serve` runs it locally), behind its own dynamic batcher.

    The supervisor's watchdog turns a hung stage into a fatal failure, and failed batches in a row
    or a dead vLLM thread too; it then rebuilds the engine in this process while batches are
    refused at once (`EngineRestarting`, which the front door sends to another replica). Meanwhile
    the health check fails, so Ray stops routing here and, if the rebuild outlasts
    `REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD` checks, replaces the replica.
    """

    async def __init__(self, bundle_path: str, runtime: RuntimeConfig, engine: EngineName, batcher: BatcherConfig,
                       supervisor: SupervisorConfig | None = None):
        import ray
        from ray import serve

        self.replica = serve.get_replica_context().replica_tag
        self.node = ray.get_runtime_context().get_node_id()[:12]
        cfg = supervisor or SupervisorConfig()
        # Off the replica's loop: loading checks every file's sha256 and starts the LLM engine. The
        # supervisor learns its loop from the first batch (the warm-up below).
        self.engine = await asyncio.to_thread(
            EngineSupervisor, lambda: inject_faults(load_recognizer(bundle_path, runtime, engine)), cfg)
        await warm_up(self.engine)  # before Ray marks the replica RUNNING and routes to it
        self.batcher = DynamicBatcher(self.engine, batcher)
        self.batcher.start()
        log.info("engine replica %s on node %s ready", self.replica, self.node)

    def describe(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {"labels": list(self.engine.labels), "info": self.engine.info(), "replica": self.replica,
                "node": self.node, "pid": os.getpid(), "fatal_failures": stats.fatal_failures,
                "rebuilds": len(stats.recovery_s)}

    async def recognize(self, batch: list[Utterance]) -> ReplicaReply:
        # Ray hands numpy arrays over read-only (zero-copy): give the engine writable audio.
        batch = [dataclasses.replace(u, audio=np.require(u.audio, requirements="W")) for u in batch]
        predictions = await asyncio.gather(*(self.batcher.submit(u) for u in batch))
        return ReplicaReply(self.replica, self.node, list(predictions))

    def check_health(self) -> None:
        """Ray calls this every `health_check_period_s`; failing it three times in a row (a rebuild
        slower than that) makes Ray take the replica out of rotation and replace it."""
        if not self.engine.serving:
            raise RuntimeError("the engine failed (hung, broken or failing every batch) and is being rebuilt")

    async def __del__(self) -> None:  # Ray Serve awaits this when it stops the replica
        await self.batcher.close(timeout=5.0)
        await self.engine.close()
