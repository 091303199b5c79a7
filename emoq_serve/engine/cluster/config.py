"""Cluster settings: how many replicas, what each reserves, how the front door calls them."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass


from emoq_serve.engine.faults import FAULT_ENV
from emoq_serve.executors.config import RuntimeConfig

log = logging.getLogger(__name__)

#: Environment the replicas need to behave like `emoq serve` (copied from the front door when set).
FORWARDED_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "EMOQ_CACHE",
                 "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", FAULT_ENV)
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
    #: One send of a batch gives up after this long (a hung or lost replica), or sooner to leave
    #: its retry a share of the callers' deadline.
    call_timeout_s: float = 60.0
    #: How often the front door reads replica readiness from Serve (its gRPC health follows), and
    #: how long one read may take (a blocked read counts as no replica running).
    status_poll_s: float = 1.0
    status_timeout_s: float = 5.0
    #: Serve unreachable this long (the head node gone) = the cluster is lost: the front door
    #: drains and exits non-zero so that its supervisor restarts it against a live cluster.
    lost_timeout_s: float = 30.0
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
        if min(self.call_timeout_s, self.status_poll_s, self.status_timeout_s, self.lost_timeout_s,
               self.health_check_period_s, self.target_ongoing_batches) <= 0:
            raise ValueError("call_timeout_s, status_poll_s, status_timeout_s, lost_timeout_s, health_check_period_s "
                             "and target_ongoing_batches must be > 0")
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
    """Ray resources per replica: the flags', else the runtime's compute budget (`compute_slots`
    when its plan shares the cores, else the ONNX stages of `graph_workers` batches plus the LLM's
    torch threads) and one GPU when the device is cuda."""
    cpus = cfg.replica_cpus
    if cpus is None:
        cpus = runtime.compute_slots or (
            runtime.graph_workers * max(runtime.audio_threads, runtime.former_threads) + runtime.torch_threads)
    gpus = cfg.replica_gpus if cfg.replica_gpus is not None else (1.0 if runtime.device == "cuda" else 0.0)
    return {"num_cpus": float(cpus), "num_gpus": float(gpus)}
