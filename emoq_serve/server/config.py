"""Server settings: network, batching, input limits, shutdown and security, in one dataclass.

The CLI fills a `ServerConfig`; `app.build_server` reads nothing else. Limits live here (not in
the model) because they protect the service: they bound memory and compute per call. The
batcher's, the supervisor's and the ASR engine's settings are their own small configs, nested
here rather than spelled out again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from emoq_serve.config import check_literals
from emoq_serve.engine.batcher import BatcherConfig
from emoq_serve.engine.supervisor import SupervisorConfig
from emoq_serve.speech.asr import AsrConfig

if TYPE_CHECKING:  # the CLI parser imports this module: keep it light (vad imports onnxruntime)
    from emoq_serve.engine.cluster import ClusterConfig
    from emoq_serve.speech.vad import VadParams

#: Server-wide ASR settings (`--asr`).
AsrMode = Literal["off", "auto", "always"]
ASR_MODES: tuple[str, ...] = get_args(AsrMode)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port (tests)
    metrics_port: int | None = 9090  # Prometheus /metrics; None = off, 0 = free port
    #: Dynamic batching (see emoq_serve.engine.batcher). Two batches in flight: the ONNX stages of
    #: one run while the LLM scores the other (the runtime's `cpu` preset gives each stage a thread).
    batcher: BatcherConfig = field(default_factory=lambda: BatcherConfig(max_inflight_batches=2))
    # Input limits (INVALID_ARGUMENT beyond them).
    min_sample_rate_hz: int = 8_000
    max_sample_rate_hz: int = 192_000
    max_audio_seconds: float = 30.0
    #: Shortest audio accepted: one HuBERT frame (400 samples at 16 kHz). Shorter audio (or a few
    #: samples at a high rate, which resample to none) would reach the model empty.
    min_audio_seconds: float = 0.025
    max_transcript_chars: int = 2_000
    max_transcript_tokens: int = 128  # counted with the bundle's transcript tokenizer
    max_speaker_chars: int = 64
    max_context_turns: int = 32  # RecognitionConfig.context: earlier turns a request may carry
    #: Largest |sample| accepted (nominal range [-1, 1]; headroom for resampler/filter overshoot).
    max_abs_sample: float = 4.0
    #: gRPC's own receive limit; a bigger message gets RESOURCE_EXHAUSTED from grpc itself.
    max_message_bytes: int = 16 * 1024 * 1024
    # Streaming.
    interim_span_s: float = 1.0  # an interim result per this much audio received
    stream_idle_timeout_s: float = 10.0  # longest silence between two stream messages
    #: Worker threads that decode, resample and segment audio off the event loop.
    decode_threads: int = 2
    # Conversation streaming (VOICE_ACTIVITY mode; see emoq_serve.server.conversation).
    vad: VadParams | None = None  # default VAD settings (None = VadParams()); clients tune within limits
    max_segment_s: float = 15.0  # longest segment: client values are clamped to it (bounds memory per stream)
    max_segment_transcript_wait_ms: int = 2_000  # cap on the client's segment_transcript_wait_ms
    max_pending_segment_transcripts: int = 64  # transcripts sent ahead of their segment, per stream
    # Call limits (RESOURCE_EXHAUSTED beyond them, before any work; see emoq_serve.server.limits).
    max_streams: int = 256  # concurrent StreamingRecognize calls
    max_buffered_audio_s: float = 1_800.0  # 16 kHz float32 audio held over all streams (64 kB per second)
    max_stream_audio_s: float = 120.0  # one stream's share of it
    max_unary_calls: int = 128  # Recognize calls in progress, server-wide (per bearer token when tokens are on)
    max_health_watches: int = 64  # open health Watch streams (unauthenticated): more get RESOURCE_EXHAUSTED
    #: VOICE_ACTIVITY: closed segments of one stream being transcribed or scored at once; at the
    #: share the stream's next message waits (back-pressure), so a stream faster than real time is
    #: paced to its own results and cannot fill the ASR queue and the batcher for everyone.
    max_stream_pending_segments: int = 2
    # Shutdown: how long in-flight calls may run after SIGTERM before they are cut off (UNAVAILABLE).
    drain_timeout_s: float = 30.0
    #: Engine supervision: hung-batch timeout, failures in a row, rebuild backoff (emoq_serve.engine.supervisor).
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    # Security (all optional). TLS files are PEM; tokens are bearer tokens, one per line.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set = mutual TLS: clients must present a cert it signed
    auth_tokens_file: str | None = None
    # Speech recognition for audio without a transcript (see emoq_serve.speech.asr).
    #: off: never (requests asking for it are refused); auto: when the client sent no transcript;
    #: always: replace the client's. A request's RecognitionConfig.asr overrides it per call.
    asr: AsrMode = "auto"
    #: The ASR engine loaded unless `asr` is off: model folder (None = the bundled tiny.en),
    #: threads, compute type.
    asr_engine: AsrConfig = field(default_factory=AsrConfig)
    #: Where the engine runs: None = in this process; set = as Ray Serve replicas (`--ray-address`).
    cluster: ClusterConfig | None = None

    def __post_init__(self) -> None:
        check_literals(self, asr=AsrMode)
        # Fail closed: half a TLS setting must not fall back to plaintext without client checks.
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: refusing to serve "
                             "plaintext without client authentication")
        if self.max_health_watches < 0:
            raise ValueError(f"max_health_watches must be >= 0, got {self.max_health_watches}")

    def replace(self, **changes: object) -> ServerConfig:
        return dataclasses.replace(self, **changes)
