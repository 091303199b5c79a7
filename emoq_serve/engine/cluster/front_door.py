"""`ClusterRecognizer`: the front door's engine, a `Recognizer` that sends batches to replicas."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from emoq_serve.engine.batcher import BATCH_DEADLINE, DeadlineExpired, QueueFull
from emoq_serve.engine.cluster.config import DEPLOYMENT_NAME, ClusterConfig
from emoq_serve.engine.cluster.replica import ReplicaReply
from emoq_serve.engine.supervisor import EngineRestarting
from emoq_serve.executors.types import EngineUnavailable, Prediction, Utterance

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Sends that use up no attempt, at most this many per batch: refusals (`EngineRestarting`: a
#: replica rebuilding its engine, nothing computed) and sends to a replica already found dead.
MAX_REFUSALS = 8


def retryable(exc: BaseException) -> bool:
    """Whether another replica may answer a batch that failed on one: anything but the callers'
    deadline passing or a full replica queue (back-pressure the client must see). Scoring is
    idempotent, so a replica that died, hung, broke or failed the batch costs one more send."""
    return not isinstance(exc, DeadlineExpired | QueueFull)


def dead_replica(exc: BaseException) -> str | None:
    """The Ray actor id of the replica a send found dead or unreachable, else None."""
    from ray.exceptions import RayActorError

    return exc.actor_id if isinstance(exc, RayActorError) else None


def in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`fn(*args)` on a daemon thread, as a future of the running loop. For Ray calls that can
    block for good (a lost head node, a replica Ray cannot place): `asyncio.to_thread`'s worker
    would keep the process from exiting after its caller gave up on it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not future.done():  # the caller may have stopped waiting (a timeout cancels it)
            future.set_exception(exc) if exc is not None else future.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as raised:  # noqa: BLE001 (handed to the awaiting task)
            result, exc = None, raised
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name=f"emoq-ray-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


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
    refusals: int = 0


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
        self._status_call: asyncio.Future[int] | None = None
        #: Set once Serve has been unreachable for `cfg.lost_timeout_s` (see `wait_lost`).
        self.lost = asyncio.Event()

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
            "retries": Counter("emoq_replica_retries",
                               "Batches sent again after their replica died, hung or failed them.", registry=registry),
        }
        Gauge("emoq_replicas_running", "Engine replicas Ray Serve reports RUNNING.",
              registry=registry).set_function(lambda: self.running_replicas)

    def start(self) -> None:
        """Start following replica readiness (call on the serving loop)."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="emoq-cluster-status")

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        """Send the batch to a replica; one that dies, hangs or fails it is given up on and the
        batch goes to another (up to `cfg.attempts` sends), each send bounded so that the sends
        left still fit in the callers' deadline. Uses no send: a refusal by a rebuilding replica,
        and a send that Ray's router gave to a replica this batch already found dead (until the
        router learns of the death; a batch that kills replicas still kills at most `attempts`)."""
        deadline = BATCH_DEADLINE.get()
        sends = refusals = 0
        dead: set[str] = set()
        while True:
            if not self.serving:
                raise EngineUnavailable("no engine replica is ready (Ray is starting them): retry shortly")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExpired("the deadline passed before a replica could compute the batch")
            budget = self.cfg.call_timeout_s if left is None else min(self.cfg.call_timeout_s,
                                                                       left / (self.cfg.attempts - sends))
            try:
                return self._observe(await self._send(batch, budget), len(batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not retryable(exc):
                    raise
                failure = exc
            replica = dead_replica(failure)
            if (isinstance(failure, EngineRestarting) or replica in dead) and refusals < MAX_REFUSALS:
                refusals += 1
                self.stats.refusals += 1
                await asyncio.sleep(min(0.05 * 2 ** refusals, 0.5))  # Ray's router learns of it meanwhile
                continue
            if replica is not None:
                dead.add(replica)
            sends += 1
            if sends >= self.cfg.attempts:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExpired("the deadline passed while replicas computed the batch") from failure
                raise EngineUnavailable(f"the engine replicas failed this batch {sends} time(s), last: "
                                        f"{type(failure).__name__}: {failure}") from failure
            self.stats.retries += 1
            if "retries" in self._series:
                self._series["retries"].inc()
            log.warning("replica failed a batch (%s: %s); sending the batch of %d again", type(failure).__name__,
                        str(failure).splitlines()[0] if str(failure) else "", len(batch))

    async def _send(self, batch: list[Utterance], budget: float) -> ReplicaReply:
        """One send: the reply, or the replica's own exception (out of Ray's wrapper), or
        `EngineUnavailable` when no answer came within `budget` seconds."""
        response = self._handle.recognize.remote(batch)
        try:
            async with asyncio.timeout(budget):
                return await response
        except TimeoutError:
            response.cancel()
            raise EngineUnavailable(f"no engine replica answered within {budget:.3g} s") from None
        except asyncio.CancelledError:  # the batcher gave up on the batch: so does the replica
            response.cancel()
            raise
        except Exception as raised:
            exc = replica_error(raised)
            if exc is raised:
                raise
            raise exc from raised  # the replica's own message; the chain keeps Ray's for the log

    def _observe(self, reply: ReplicaReply, size: int) -> list[Prediction]:
        self.stats.batches[reply.replica] += 1
        if self._series:
            self._series["batches"].labels(reply.replica, reply.node).inc()
            self._series["utterances"].labels(reply.replica, reply.node).inc(size)
        return reply.predictions

    async def _poll(self) -> None:
        """Follow Serve's replica states; health turns NOT_SERVING while none is RUNNING, while
        Serve does not answer within `status_timeout_s`, and for good once it has not answered
        for `lost_timeout_s` (`lost` is set: the head node is gone)."""
        unreachable_since: float | None = None
        while True:
            try:
                running = await self._running_replicas()
                unreachable_since = None
            except Exception as exc:  # the controller is unreachable: nothing can be routed either
                log.warning("cannot read the Serve status (%s: %s)", type(exc).__name__, exc)
                running = 0
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since >= self.cfg.lost_timeout_s and not self.lost.is_set():
                    log.error("Ray Serve unreachable for %.0f s: the cluster is lost", self.cfg.lost_timeout_s)
                    self.lost.set()
            self.running_replicas = running
            serving = running > 0 and not self.lost.is_set()
            if serving != self.serving:
                self.serving = serving
                log.warning("engine replicas running: %d -> %s", running, "SERVING" if serving else "NOT_SERVING")
                if self.on_state is not None:
                    try:
                        await self.on_state(serving)
                    except Exception:  # a listener's bug must not stop health from following the replicas
                        log.exception("the serving-state listener failed; the replica poller goes on")
            await asyncio.sleep(self.cfg.status_poll_s)

    async def _running_replicas(self) -> int:
        """`running_replicas` within `status_timeout_s` (TimeoutError past it). A read that blocks
        is waited on by the next poll instead of starting another beside it."""
        if self._status_call is None or self._status_call.done():
            self._status_call = in_daemon_thread(running_replicas, self.cfg.app_name)
        try:
            return await asyncio.wait_for(asyncio.shield(self._status_call), self.cfg.status_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no Serve status within {self.cfg.status_timeout_s:g} s") from None

    async def wait_lost(self) -> None:
        """Return once the cluster is lost (the front door then drains and exits)."""
        await self.lost.wait()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop polling. A front door that started its own "local" Ray tears it down (giving up
        after `timeout_s`: a Ray that does not answer must not hold the exit); on a shared cluster
        the replicas stay for the other front doors (`serve delete APP` removes them)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._owns_ray:
            try:
                await asyncio.wait_for(in_daemon_thread(shutdown_local_ray), timeout_s)
            except TimeoutError:
                log.error("the local Ray did not shut down within %.0f s; exiting without it", timeout_s)


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
