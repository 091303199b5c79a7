"""Build, start and stop the gRPC server around a loaded `Recognizer`.

Shutdown order (SIGTERM/SIGINT, or `stop()`): health turns NOT_SERVING so orchestrators stop
routing here, new recognition calls get UNAVAILABLE while health stays reachable, accepted calls
run to completion for up to `drain_timeout_s`, then whatever is left is cut off with UNAVAILABLE
and a message (never dropped silently) and the transport stops.

Engine health: when the recognizer reports its state (an `EngineSupervisor`, or the cluster
engine), health follows it: NOT_SERVING while the engine is rebuilt after a fatal failure, or
while no cluster replica is ready; SERVING again after. `serve_bundle` serves a local engine
through a supervisor, so `emoq serve` recovers from a dead engine without a process restart; in
cluster mode (`ServerConfig.cluster`) each replica supervises its own engine and Ray Serve
replaces replicas that die or fail their health check; a front door whose cluster is lost (Serve
unreachable, the head node gone) drains and exits with `EXIT_CLUSTER_LOST`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from emoq_serve._proto import emoq_pb2
from emoq_serve.bundle import Bundle
from emoq_serve.executors import EngineName, load_recognizer, warm_up
from emoq_serve.speech.asr import AsrEngine, load_asr
from emoq_serve.engine.batcher import DynamicBatcher
from emoq_serve.engine.faults import inject_faults
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.types import Recognizer, SupportsMetrics, SupportsServingState
from emoq_serve.server.auth import BearerTokenInterceptor, load_tokens, server_credentials
from emoq_serve.server.config import ServerConfig
from emoq_serve.server.health import BoundedHealthServicer
from emoq_serve.server.telemetry import ServerMetrics
from emoq_serve.server.service import EmotionRecognizerService
from emoq_serve.engine.supervisor import EngineSupervisor
from emoq_serve.server.transcripts import TranscriptStage
from emoq_serve.server.validation import RequestValidator, tolerant_parser

log = logging.getLogger(__name__)

SERVICE_NAME = emoq_pb2.DESCRIPTOR.services_by_name["EmotionRecognizer"].full_name
#: `emoq serve`'s exit status after its cluster was lost (an orchestrator restarts it).
EXIT_CLUSTER_LOST = 3


def transcript_token_counter(bundle: Bundle) -> Callable[[str], int]:
    """Count transcript tokens the way the model's transcript tokenizer does."""
    from emoq_serve.executors.inputs import text_tokenizer  # lazy: loads transformers

    tokenizer = text_tokenizer(bundle)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def add_service(service: EmotionRecognizerService, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated `add_EmotionRecognizerServicer_to_server`, but with
    deserializers that hand malformed bytes to the service (INVALID_ARGUMENT) instead of raising."""
    pb = emoq_pb2
    handlers = {
        "Recognize": grpc.unary_unary_rpc_method_handler(
            service.Recognize, tolerant_parser(pb.RecognizeRequest), pb.RecognizeResponse.SerializeToString
        ),
        "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
            service.StreamingRecognize, tolerant_parser(pb.StreamingRecognizeRequest),
            pb.StreamingRecognizeResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, tolerant_parser(pb.GetModelInfoRequest), pb.GetModelInfoResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class EmotionServer:
    """One gRPC server (recognition + health + reflection) plus its batcher and metrics port.

    The caller owns `recognizer` and `asr` (loads and closes them); the server owns everything
    else. Without an `asr` engine the server runs as `--asr off` whatever `cfg.asr` says
    (`bundle_server` loads one whenever `cfg.asr` is not off).
    """

    #: Health service names kept in step: the whole server ("") and the recognition service.
    HEALTH_NAMES = ("", SERVICE_NAME)

    def __init__(
        self, recognizer: Recognizer, cfg: ServerConfig, count_tokens: Callable[[str], int] | None = None,
        asr: AsrEngine | None = None,
    ) -> None:
        self.cfg = cfg
        self.recognizer = recognizer
        self.batcher = DynamicBatcher(recognizer, cfg.batcher, on_batch=self._observe_batch)
        self.metrics = ServerMetrics(queue_depth=lambda: self.batcher.queue_depth)
        transcripts = TranscriptStage(asr, cfg.asr, count_tokens, cfg.max_transcript_tokens)
        self.service = EmotionRecognizerService(
            recognizer, self.batcher, RequestValidator(cfg, count_tokens, asr_available=asr is not None), self.metrics,
            cfg, transcripts,
        )
        self.health = BoundedHealthServicer(cfg.max_health_watches, self.metrics.health_watches_refused)
        self.metrics.health_watches.set_function(lambda: self.health.watching)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._engine_serving = True
        self._speech_healthy = True
        self._speech_watch: asyncio.Task[None] | None = None
        if isinstance(recognizer, SupportsServingState):
            recognizer.on_state = self._engine_state
        if isinstance(recognizer, SupportsMetrics):
            recognizer.bind_metrics(self.metrics.registry)

    async def _engine_state(self, serving: bool) -> None:
        self._engine_serving = serving
        await self._publish_health()

    async def _publish_health(self) -> None:
        """Health is SERVING while the engine serves and the ASR and VAD workers are not hung (a
        draining server stays NOT_SERVING)."""
        if self._server is None or self.service.draining:
            return
        serving = self._engine_serving and self._speech_healthy
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.HEALTH_NAMES:
            await self.health.set(name, status)

    async def _watch_speech(self, period_s: float = 0.5) -> None:
        """A hung ASR or VAD call cannot report itself: poll their workers' health."""
        while True:
            healthy = self.service.speech_healthy()
            if healthy != self._speech_healthy:
                log.log(logging.INFO if healthy else logging.ERROR, "speech workers %s",
                        "recovered" if healthy else "hung: health is NOT_SERVING until they recover")
                self._speech_healthy = healthy
                await self._publish_health()
            await asyncio.sleep(period_s)

    def _observe_batch(self, size: int) -> None:
        self.metrics.batch_size.observe(size)

    async def start(self) -> None:
        tokens = load_tokens(self.cfg)
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(tokens)] if tokens else None,
            options=[
                ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
                ("grpc.max_send_message_length", self.cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # A fixed flow-control window per stream: with BDP probing gRPC grows it to megabytes,
                # and a client sending faster than the server decodes parks that much in the transport.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        add_service(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"{self.cfg.host}:{self.cfg.port}"
        credentials = server_credentials(self.cfg)
        if credentials is None:
            if tokens:
                log.warning("bearer tokens over plaintext: anyone on the network path can read and replay them; "
                            "serve with --tls-cert and --tls-key")
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        self.batcher.start()
        self.service.per_token = bool(tokens)
        await server.start()
        self._server = server
        self._speech_watch = asyncio.create_task(self._watch_speech(), name="emoq-speech-health")
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.host, self.cfg.metrics_port)
        await self._engine_state(not isinstance(self.recognizer, SupportsServingState) or self.recognizer.serving)
        log.info(
            "serving %s on %s:%d (%s, %d token(s)); metrics on port %s",
            SERVICE_NAME, self.cfg.host, self.port, "TLS" if credentials else "plaintext",
            len(tokens), self.metrics_port,
        )

    async def stop(self) -> None:
        """Drain and stop (idempotent): NOT_SERVING, refuse new calls, finish accepted ones."""
        if self._server is None:
            return
        server, self._server = self._server, None
        if self._speech_watch is not None:
            self._speech_watch.cancel()
        await self.health.enter_graceful_shutdown()
        left = await self.service.drain(self.cfg.drain_timeout_s)
        if left:
            log.warning("drain timeout (%.1f s): cut off %d call(s) with UNAVAILABLE", self.cfg.drain_timeout_s, left)
        await server.stop(grace=1.0)
        await self.batcher.close(timeout=1.0)
        self.service.close()
        self.metrics.stop()
        self._stopped.set()
        log.info("server stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def stop_on_signals(self) -> None:
        """SIGTERM/SIGINT start a graceful `stop()` (call from the serving event loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: self._on_signal(s))

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: draining for up to %.1f s", sig.name, self.cfg.drain_timeout_s)
        if self._stop_task is None:  # a second signal does not restart the drain
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())


@asynccontextmanager
async def bundle_server(
    bundle_path: str | Path, runtime_cfg: RuntimeConfig, cfg: ServerConfig, engine: EngineName = "onnx"
) -> AsyncIterator[EmotionServer]:
    """A started server on the bundle; drained, stopped and its engine released on exit.

    The engine is supervised: after a fatal failure it is rebuilt from the bundle, whose hashes
    are checked again (unless `runtime_cfg.verify_hashes` is off), so a bundle changed on disk
    since start-up is refused rather than served.

    Unless `cfg.asr` is off, the ASR model is loaded and checked first (`AsrError` with the
    reason when its folder is missing or broken), before the slower engine start.
    """
    asr = None if cfg.asr == "off" else await asyncio.to_thread(load_asr, cfg.asr_engine)
    try:
        if cfg.cluster is None:
            recognizer: Recognizer = EngineSupervisor(
                lambda: inject_faults(load_recognizer(bundle_path, runtime_cfg, engine)), cfg.supervisor)
            bundle = Bundle.open(bundle_path, verify_hashes=False)  # just verified: read its metadata only
        else:  # the replicas verify the bundle; the front door reads its tokenizer and limits
            recognizer, bundle = await cluster_engine(bundle_path, runtime_cfg, cfg, engine)
            # Batches for every replica in flight at once; each replica batches again behind it.
            inflight = cfg.batcher.max_inflight_batches * cfg.cluster.most_replicas
            cfg = cfg.replace(batcher=dataclasses.replace(cfg.batcher, max_inflight_batches=inflight))
        # Longer transcripts would be cut by the former anyway: refuse them instead of guessing.
        cfg = cfg.replace(
            max_transcript_tokens=min(cfg.max_transcript_tokens, bundle.model_config.former.max_text_tokens)
        )
        server = EmotionServer(recognizer, cfg, transcript_token_counter(bundle), asr)
        try:
            await warm_up(recognizer)  # before SERVING, so no client pays the first-call costs
            await server.start()
            yield server
        finally:
            await server.stop()
            await recognizer.close()
    finally:
        if asr is not None:
            asr.close()


async def cluster_engine(
    bundle_path: str | Path, runtime_cfg: RuntimeConfig, cfg: ServerConfig, engine: EngineName
) -> tuple[Recognizer, Bundle]:
    """The engine as Ray Serve replicas (`cfg.cluster`), and the bundle as the front door reads it."""
    from emoq_serve.engine.cluster import connect_cluster  # imports ray: cluster mode only

    assert cfg.cluster is not None
    bundle = await asyncio.to_thread(Bundle.open, bundle_path, runtime_cfg.verify_hashes)
    recognizer = await connect_cluster(bundle_path, bundle.bundle_id, runtime_cfg, engine, cfg.batcher, cfg.cluster,
                                       cfg.supervisor)
    return recognizer, bundle


async def serve_bundle(
    bundle_path: str | Path, runtime_cfg: RuntimeConfig, cfg: ServerConfig, engine: EngineName = "onnx"
) -> int:
    """Load the bundle and serve it until SIGTERM/SIGINT (exit status 0) or, in cluster mode, until
    the cluster is lost (`EXIT_CLUSTER_LOST`); then drain and release the engine."""
    async with bundle_server(bundle_path, runtime_cfg, cfg, engine) as server:
        server.stop_on_signals()
        waits = [asyncio.create_task(server.wait_stopped())]
        if cfg.cluster is not None:
            from emoq_serve.engine.cluster.front_door import ClusterRecognizer  # cluster mode only

            assert isinstance(server.recognizer, ClusterRecognizer)
            waits.append(asyncio.create_task(server.recognizer.wait_lost()))
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if waits[0] in done:
            return 0
        log.error("the Ray cluster is lost: draining for up to %.1f s, then exiting with status %d",
                  cfg.drain_timeout_s, EXIT_CLUSTER_LOST)
        await server.stop()
        return EXIT_CLUSTER_LOST
