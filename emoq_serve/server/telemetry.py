"""Prometheus metrics for the server, served over HTTP on their own port.

A separate port keeps scraping off the gRPC path (and out of its auth). Each server owns its
own `CollectorRegistry`, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from emoq_serve.executors.types import STAGES

#: Latency buckets (seconds): sub-millisecond stages up to multi-second queued calls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Stages timed per result: the server's ASR (before the batcher) and the engine's stages.
RESULT_STAGES = ("asr", *STAGES)


class ServerMetrics:
    """Request outcomes, per-stage latency, queue depth and batch sizes."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "emoq_requests", "Finished calls by method and gRPC status code.", ["method", "code"], registry=self.registry
        )
        self.stage_latency = Histogram(
            "emoq_stage_latency_seconds",
            "Time per pipeline stage (asr, queue, audio_encoder, former, pooling, llm) and total per result.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "emoq_batch_size", "Utterances per batch sent to the engine.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.vad_batch_size = Histogram(
            "emoq_vad_batch_size", "Streams scored together per VAD step (VOICE_ACTIVITY streams).",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("emoq_queue_depth", "Utterances waiting for a batch.", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.inflight = Gauge("emoq_inflight_calls", "gRPC calls being handled.", registry=self.registry)
        self.open_streams = Gauge("emoq_open_streams", "StreamingRecognize calls open.", registry=self.registry)
        self.buffered_audio = Gauge(
            "emoq_buffered_audio_seconds", "Audio held over all open streams (16 kHz seconds).", registry=self.registry
        )
        self.health_watches = Gauge("emoq_health_watches", "Open health Watch streams.", registry=self.registry)
        self.health_watches_refused = Counter(
            "emoq_health_watches_refused", "Health Watch streams refused past --max-health-watches.",
            registry=self.registry,
        )
        self._http = None

    def observe_result(self, timings_ms: dict[str, float], total_ms: float) -> None:
        for stage in RESULT_STAGES:
            if stage in timings_ms:
                self.stage_latency.labels(stage).observe(timings_ms[stage] / 1e3)
        self.stage_latency.labels("total").observe(total_ms / 1e3)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 = any free one)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
