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
Modules: `config` (ClusterConfig, what a replica reserves), `replica` (the deployment class),
`front_door` (ClusterRecognizer), `deploy` (deploying or joining, and the KubeRay builder
`emoq_serve.engine.cluster:build_app`).
"""

from emoq_serve.engine.cluster.config import DEPLOYMENT_NAME, ClusterConfig, replica_resources
from emoq_serve.engine.cluster.deploy import build_app, connect_cluster

__all__ = ["DEPLOYMENT_NAME", "ClusterConfig", "build_app", "connect_cluster", "replica_resources"]
