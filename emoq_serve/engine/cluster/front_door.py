"""`ClusterRecognizer`: the front door's engine, a `Recognizer` that sends batches to replicas."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


from emoq_serve.engine.batcher import BATCH_DEADLINE, BatcherClosed, DeadlineExpired
from emoq_serve.executors.types import EngineFailure, EngineUnavailable, Prediction, Utterance

log = logging.getLogger(__name__)

from emoq_serve.engine.cluster.config import DEPLOYMENT_NAME, ClusterConfig
from emoq_serve.engine.cluster.replica import ReplicaReply


def replica_died(exc: BaseException) -> bool:
    """Whether a batch failed because its replica went away (died, or is shutting down) or its
    engine broke, not because of the batch: then another replica computes the same answer."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError | EngineFailure | BatcherClosed)


def replica_error(exc: Exception) -> Exception:
    """The exception the replica raised, out of Ray's wrapper (whose text names the replica's
    process, pid and ip: a client must see the replica's own message, e.g. a full queue's)."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, Exception) else exc


@dataclass
class ClusterStats:
    """Front door counters since start: batches per replica, retries after a replica died."""

    batches: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: int = 0


class ClusterRecognizer:
    """The front door's engine: batches go to the Serve deployment's replicas (see the module doc)."""

    def __init__(self, handle: Any, cfg: ClusterConfig, description: dict[str, Any], owns_ray: bool) -> None:
        import ray

        self.cfg = cfg
        self.labels = tuple(description["labels"])
        self._info = {**description["info"], "engine_location": f"ray-serve:{cfg.app_name}", "ray": ray.__version__}
        self._handle = handle
        self._owns_ray = owns_ray
        self.stats = ClusterStats()
        self.serving = True
        self.running_replicas = 0
        self.on_state: Callable[[bool], Awaitable[None]] | None = None
        self._series: dict[str, Any] = {}
        self._poller: asyncio.Task[None] | None = None

    def info(self) -> dict[str, str]:
        return dict(self._info)

    def bind_metrics(self, registry: Any) -> None:
        """Per-replica series on the front door's Prometheus registry (`ServerMetrics.registry`)."""
        from prometheus_client import Counter, Gauge

        self._series = {
            "batches": Counter("emoq_replica_batches", "Batches computed, by engine replica and node.",
                               ["replica", "node"], registry=registry),
            "utterances": Counter("emoq_replica_utterances", "Utterances computed, by engine replica and node.",
                                  ["replica", "node"], registry=registry),
            "retries": Counter("emoq_replica_retries", "Batches sent again after their replica died.",
                               registry=registry),
        }
        Gauge("emoq_replicas_running", "Engine replicas Ray Serve reports RUNNING.",
              registry=registry).set_function(lambda: self.running_replicas)

    def start(self) -> None:
        """Start following replica readiness (call on the serving loop)."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="emoq-cluster-status")

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        deadline = BATCH_DEADLINE.get()
        for attempt in range(1, self.cfg.attempts + 1):
            if not self.serving:
                raise EngineUnavailable("no engine replica is ready (Ray is starting them): retry shortly")
            budget = self.cfg.call_timeout_s if deadline is None else min(self.cfg.call_timeout_s,
                                                                           deadline - time.monotonic())
            if budget <= 0:
                raise DeadlineExpired("the deadline passed before a replica could compute the batch again")
            response = self._handle.recognize.remote(batch)
            try:
                async with asyncio.timeout(budget):
                    reply: ReplicaReply = await response
            except TimeoutError:
                response.cancel()
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExpired("the deadline passed while a replica computed the batch") from None
                raise EngineUnavailable(f"no engine replica answered within {self.cfg.call_timeout_s:g} s") from None
            except asyncio.CancelledError:  # the batcher gave up on the batch: so does the replica
                response.cancel()
                raise
            except Exception as raised:
                exc = replica_error(raised)
                if not replica_died(exc):
                    raise exc from raised  # the client sees the replica's message; the log, the chain
                if attempt == self.cfg.attempts:
                    raise EngineUnavailable(f"the engine replica computing this batch died ({type(exc).__name__}); "
                                            "retry shortly") from exc
                self.stats.retries += 1
                if "retries" in self._series:
                    self._series["retries"].inc()
                log.warning("replica died mid-batch (%s: %s); sending the batch of %d again",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", len(batch))
                continue
            self._observe(reply, len(batch))
            return reply.predictions
        raise AssertionError("unreachable")

    def _observe(self, reply: ReplicaReply, size: int) -> None:
        self.stats.batches[reply.replica] += 1
        if self._series:
            self._series["batches"].labels(reply.replica, reply.node).inc()
            self._series["utterances"].labels(reply.replica, reply.node).inc(size)

    async def _poll(self) -> None:
        """Follow Serve's replica states; health turns NOT_SERVING while none is RUNNING."""
        while True:
            try:
                running = await asyncio.to_thread(running_replicas, self.cfg.app_name)
            except Exception as exc:  # the controller is unreachable: nothing can be routed either
                log.warning("cannot read the Serve status (%s: %s)", type(exc).__name__, exc)
                running = 0
            self.running_replicas = running
            serving = running > 0
            if serving != self.serving:
                self.serving = serving
                log.warning("engine replicas running: %d -> %s", running, "SERVING" if serving else "NOT_SERVING")
                if self.on_state is not None:
                    await self.on_state(serving)
            await asyncio.sleep(self.cfg.status_poll_s)

    async def close(self) -> None:
        """Stop polling. A front door that started its own "local" Ray tears it down; on a shared
        cluster the replicas stay for the other front doors (`serve delete APP` removes them)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._owns_ray:
            await asyncio.to_thread(shutdown_local_ray)


def shutdown_local_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def running_replicas(app_name: str) -> int:
    """RUNNING replicas of the engine deployment in `app_name` (0 when the app is missing)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return int(app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0))
