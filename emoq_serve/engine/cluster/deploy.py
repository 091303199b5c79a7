"""Deploying the engine on a Ray cluster (or joining its replicas), and the KubeRay builder."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any


from emoq_serve.executors import EngineName
from emoq_serve.engine.batcher import BatcherConfig, bucket_edges
from emoq_serve.engine.supervisor import SupervisorConfig
from emoq_serve.executors.config import RuntimeConfig

log = logging.getLogger(__name__)

from emoq_serve.engine.cluster.config import DEPLOYMENT_NAME, FORWARDED_ENV, ClusterConfig, replica_resources
from emoq_serve.engine.cluster.front_door import ClusterRecognizer, in_daemon_thread, running_replicas
from emoq_serve.engine.cluster.replica import EngineReplica


def engine_application(bundle_path: str, runtime: RuntimeConfig, engine: EngineName, batcher: BatcherConfig,
                       cfg: ClusterConfig, supervisor: SupervisorConfig | None = None) -> Any:
    """The Serve application: `EngineReplica` with `cfg`'s replica count or autoscaling bounds and
    `replica_resources` per replica, bound to the bundle; each replica supervises its engine with
    `supervisor` (the watchdog's timeout, failures in a row before a rebuild)."""
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
    return deployment.bind(bundle_path, runtime, engine, batcher, supervisor or SupervisorConfig())


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder, for declarative deploys (`serve run`, `serve deploy`, a KubeRay
    `RayService`): `import_path: emoq_serve.engine.cluster:build_app` with `args` `bundle` (a path
    on every node), and optionally `runtime` (preset name), `engine`, `replicas` or
    `min_replicas`/`max_replicas`, `replica_cpus`, `replica_gpus`, `max_batch`, `max_queue_delay_ms`,
    `max_inflight_batches` (unset: the preset's, as `emoq serve` does).
    Front doors then join it: `emoq serve --ray-address auto --serve-app NAME`."""
    from emoq_serve.executors.config import runtime_preset

    runtime = runtime_preset(args.get("runtime", "cpu"))
    if "max_batch" in args:
        runtime = runtime.replace(max_batch=int(args["max_batch"]))
    fields = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus")
    cfg = ClusterConfig(**{k: args[k] for k in fields if k in args})
    batcher = BatcherConfig(max_batch=runtime.max_batch, max_queue_delay_ms=float(args.get("max_queue_delay_ms", 5.0)),
                            max_inflight_batches=int(args.get("max_inflight_batches", runtime.inflight_batches)),
                            **bucket_edges(runtime.bucket_edges_s))
    supervisor = SupervisorConfig(**{k: float(args[k]) for k in ("engine_timeout_s",) if k in args})
    return engine_application(str(args["bundle"]), runtime, args.get("engine", "onnx"), batcher, cfg, supervisor)


def _deploy(bundle_path: str, runtime: RuntimeConfig, engine: EngineName, batcher: BatcherConfig,
            cfg: ClusterConfig, supervisor: SupervisorConfig) -> tuple[Any, dict[str, Any], bool]:
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
        handle = serve.run(engine_application(bundle_path, runtime, engine, batcher, cfg, supervisor), name=cfg.app_name,
                           route_prefix=None)
    description = handle.describe.remote().result(timeout_s=cfg.call_timeout_s)
    return handle, description, owns_ray


async def connect_cluster(bundle_path: str | Path, bundle_id: str, runtime: RuntimeConfig, engine: EngineName,
                          batcher: BatcherConfig, cfg: ClusterConfig,
                          supervisor: SupervisorConfig | None = None) -> ClusterRecognizer:
    """Deploy the engine on the cluster (or join its running replicas) and return the front door's
    recognizer, polling replica readiness. Fails when the replicas serve another bundle."""
    path = str(Path(bundle_path).resolve())  # the same path must hold the bundle on every node
    # In a daemon thread: a deploy that outlives the timeout (a replica Ray cannot place) waits on.
    deploy = in_daemon_thread(_deploy, path, runtime, engine, batcher, cfg, supervisor or SupervisorConfig())
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
