"""The scoring engine as Ray Serve replicas behind the gRPC front door (`emoq serve --ray-address`).

Why: one process scores as many streams as one machine's engine can. Ray Serve places engine
replicas on a cluster's nodes (a fixed `replicas` count or autoscaling bounds, CPUs/GPUs per
replica), restarts a replica that dies or fails its health check, and routes each call to a
lightly loaded replica. The front door (`emoq serve`) keeps everything a client talks to (gRPC,
streaming, segmentation, ASR, validation, auth, health, metrics, drain); only its engine changes.

- `EngineReplica` (the deployment class): loads and hash-verifies the bundle with
  `load_recognizer` (the engine `emoq serve` runs locally), warms it up and serves it behind its
  own `DynamicBatcher`, so batches from several front doors merge. Its health check fails once
  the engine reports itself broken (vLLM's engine thread), and Ray replaces the replica.
- `ClusterRecognizer` (front door): a `Recognizer` like the local engine, so the server's
  batcher and service do not know where scoring runs. It sends each batch through a Ray Serve
  `DeploymentHandle`. Scoring is idempotent, so a batch whose replica died mid-call is sent once
  more (Ray's router has by then dropped the dead replica) while its callers' deadline allows.
  It polls Serve for replica readiness: `serving` (gRPC health) is whether any replica runs.

Ray is imported only inside functions: nothing outside cluster mode pays for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emoq_serve.runtime import EngineName, load_recognizer, warm_up
from emoq_serve.runtime.batcher import BATCH_DEADLINE, BatcherClosed, BatcherConfig, DeadlineExpired, DynamicBatcher
from emoq_serve.runtime.config import RuntimeConfig
from emoq_serve.runtime.types import EngineFailure, EngineUnavailable, Prediction, Utterance

log = logging.getLogger(__name__)

#: Environment the replicas need to behave like `emoq serve` (copied from the front door when set).
FORWARDED_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "EMOQ_CACHE",
                 "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")
#: The deployment's name inside the Serve application.
DEPLOYMENT_NAME = "EngineReplica"


@dataclass
class ClusterConfig:
    """Where the engine replicas run and how many (`emoq serve --ray-address ...`)."""

    #: `ray.init` address: "local" starts a Ray instance on this machine (stopped with the front
    #: door); "auto" joins the cluster this machine is a node of; HOST:PORT names a head node.
    ray_address: str = "local"
    #: Fixed replica count, or autoscaling between `min_replicas` and `max_replicas` (both set).
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    #: Autoscaling target: batches in flight per replica.
    target_ongoing_batches: float = 2.0
    #: Ray resources per replica; None = from the runtime preset (its threads; one GPU on cuda).
    replica_cpus: float | None = None
    replica_gpus: float | None = None
    #: Serve application name: front doors that name the same application share its replicas.
    app_name: str = "emoq"
    #: Batches one replica takes at once; Ray routes past a replica at this limit.
    max_ongoing_batches: int = 4
    #: Sends of one batch: the first, then retries on another replica after a replica died.
    attempts: int = 2
    #: A batch without caller deadlines gives up after this long (a hung or lost replica).
    call_timeout_s: float = 60.0
    #: How often the front door reads replica readiness from Serve (its gRPC health follows).
    status_poll_s: float = 1.0
    #: Ray's per-replica health check (`EngineReplica.check_health`) period and timeout.
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    #: Longest wait for the replicas at start-up (a replica Ray cannot place waits forever).
    startup_timeout_s: float = 900.0
    #: Object store of a "local" Ray (bytes): batches of audio are small.
    local_object_store_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if self.autoscaling and not (0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {self.min_replicas} and {self.max_replicas}")
        if self.replicas < 1 or self.attempts < 1 or self.max_ongoing_batches < 1:
            raise ValueError("replicas, attempts and max_ongoing_batches must be >= 1")
        if min(self.call_timeout_s, self.status_poll_s, self.health_check_period_s, self.target_ongoing_batches) <= 0:
            raise ValueError("call_timeout_s, status_poll_s, health_check_period_s and target_ongoing_batches must be > 0")
        for name in ("replica_cpus", "replica_gpus"):
            if (value := getattr(self, name)) is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.autoscaling else self.replicas

    def replace(self, **changes: object) -> ClusterConfig:
        return dataclasses.replace(self, **changes)


def replica_resources(cfg: ClusterConfig, runtime: RuntimeConfig) -> dict[str, float]:
    """Ray resources per replica: the flags', else the runtime preset's threads (ONNX stages of
    `graph_workers` batches plus the LLM's torch threads) and one GPU when the device is cuda."""
    cpus = cfg.replica_cpus
    if cpus is None:
        cpus = runtime.graph_workers * max(runtime.audio_threads, runtime.former_threads) + runtime.torch_threads
    gpus = cfg.replica_gpus if cfg.replica_gpus is not None else (1.0 if runtime.device == "cuda" else 0.0)
    return {"num_cpus": float(cpus), "num_gpus": float(gpus)}


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
        watch = getattr(self.engine, "watch_failure", None)
        if watch is not None:
            watch(self._failed)
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
            await asyncio.to_thread(_shutdown_local_ray)


def running_replicas(app_name: str) -> int:
    """RUNNING replicas of the engine deployment in `app_name` (0 when the app is missing)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return int(app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0))


def _shutdown_local_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def engine_application(bundle_path: str, runtime: RuntimeConfig, engine: EngineName, batcher: BatcherConfig,
                       cfg: ClusterConfig) -> Any:
    """The Serve application: `EngineReplica` with `cfg`'s replica count or autoscaling bounds and
    `replica_resources` per replica, bound to the bundle."""
    from ray import serve

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in the replica process
    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                "target_ongoing_requests": cfg.target_ongoing_batches}}
        if cfg.autoscaling else {"num_replicas": cfg.replicas}
    )
    deployment = serve.deployment(EngineReplica, name=DEPLOYMENT_NAME).options(
        ray_actor_options={**replica_resources(cfg, runtime), "runtime_env": {"env_vars": env}},
        max_ongoing_requests=cfg.max_ongoing_batches,
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        max_constructor_retry_count=3,  # a bundle that fails verification fails the deploy soon
        logging_config={"enable_access_log": False},  # no log line per batch (the front door has metrics)
        **scaling,
    )
    return deployment.bind(bundle_path, runtime, engine, batcher)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder, for declarative deploys (`serve run`, `serve deploy`, a KubeRay
    `RayService`): `import_path: emoq_serve.runtime.cluster:build_app` with `args` `bundle` (a path
    on every node), and optionally `runtime` (preset name), `engine`, `replicas` or
    `min_replicas`/`max_replicas`, `replica_cpus`, `replica_gpus`, `max_batch`, `max_queue_delay_ms`.
    Front doors then join it: `emoq serve --ray-address auto --serve-app NAME`."""
    from emoq_serve.runtime.config import runtime_preset

    runtime = runtime_preset(args.get("runtime", "cpu"))
    if "max_batch" in args:
        runtime = runtime.replace(max_batch=int(args["max_batch"]))
    fields = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus")
    cfg = ClusterConfig(**{k: args[k] for k in fields if k in args})
    batcher = BatcherConfig(max_batch=runtime.max_batch, max_queue_delay_ms=float(args.get("max_queue_delay_ms", 5.0)),
                            max_inflight_batches=2)
    return engine_application(str(args["bundle"]), runtime, args.get("engine", "onnx"), batcher, cfg)


def _deploy(bundle_path: str, runtime: RuntimeConfig, engine: EngineName, batcher: BatcherConfig,
            cfg: ClusterConfig) -> tuple[Any, dict[str, Any], bool]:
    """Join (or start) Ray, deploy the engine, wait for its replicas: (handle, description, owns_ray)."""
    import ray
    from ray import serve

    owns_ray = False
    if not ray.is_initialized():
        local = cfg.ray_address == "local"
        ray.init(address=cfg.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 **({"object_store_memory": cfg.local_object_store_bytes} if local else {}))
        owns_ray = local
    # The front door is the ingress: Serve's HTTP proxies are not needed (a no-op if Serve runs).
    serve.start(proxy_location="Disabled")
    if running_replicas(cfg.app_name) > 0:
        # Another front door deployed it: share its replicas (re-deploying would restart them).
        log.warning("joining the running replicas of Serve application %r; this front door's replica settings "
                    "are not applied (`serve delete %s` first to change them)", cfg.app_name, cfg.app_name)
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, cfg.app_name)
    else:
        scale = f"{cfg.min_replicas}-{cfg.max_replicas} replicas" if cfg.autoscaling else f"{cfg.replicas} replica(s)"
        log.info("deploying %s to Ray Serve application %r: %s, %s each", DEPLOYMENT_NAME, cfg.app_name, scale,
                 replica_resources(cfg, runtime))
        handle = serve.run(engine_application(bundle_path, runtime, engine, batcher, cfg), name=cfg.app_name,
                           route_prefix=None)
    description = handle.describe.remote().result(timeout_s=cfg.call_timeout_s)
    return handle, description, owns_ray


async def connect_cluster(bundle_path: str | Path, bundle_id: str, runtime: RuntimeConfig, engine: EngineName,
                          batcher: BatcherConfig, cfg: ClusterConfig) -> ClusterRecognizer:
    """Deploy the engine on the cluster (or join its running replicas) and return the front door's
    recognizer, polling replica readiness. Fails when the replicas serve another bundle."""
    path = str(Path(bundle_path).resolve())  # the same path must hold the bundle on every node
    deploy = asyncio.to_thread(_deploy, path, runtime, engine, batcher, cfg)
    try:
        handle, description, owns_ray = await asyncio.wait_for(deploy, cfg.startup_timeout_s)
    except TimeoutError:
        raise RuntimeError(f"the engine replicas were not ready within {cfg.startup_timeout_s:g} s "
                           f"(does the cluster have {replica_resources(cfg, runtime)} free per replica?)") from None
    served = description["info"].get("bundle_id")
    recognizer = ClusterRecognizer(handle, cfg, description, owns_ray)
    if served != bundle_id:
        await recognizer.close()
        raise RuntimeError(f"the replicas of Serve application {cfg.app_name!r} serve bundle {served}, this front "
                           f"door has {bundle_id}: use the same bundle, or another --serve-app name")
    recognizer.start()
    log.info("engine replicas ready (first answered: replica %s on node %s)", description["replica"],
             description["node"])
    return recognizer

