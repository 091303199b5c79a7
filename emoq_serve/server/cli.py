"""`emoq serve`: serve a bundle over gRPC (flags -> `RuntimeConfig` + `ServerConfig`).

Parsing stays import-light (every `emoq` call builds this parser); the engine, grpc and
the model load only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses

from emoq_serve.engine.batcher import DEFAULT_BUCKET_EDGES_S, BatcherConfig, bucket_edges
from emoq_serve.engine.cluster import ClusterConfig
from emoq_serve.engine.supervisor import SupervisorConfig
from emoq_serve.executors.config import RUNTIME_PRESETS, RuntimeConfig, runtime_preset
from emoq_serve.server.config import ASR_MODES, ServerConfig
from emoq_serve.speech.asr import AsrConfig


def register(sub: argparse._SubParsersAction) -> None:
    d = ServerConfig()
    p = sub.add_parser("serve", help="serve a bundle over gRPC (batched; health, reflection, Prometheus metrics)")
    p.add_argument("--bundle", default=None, help="bundle folder from `emoq export` (default: the demo bundle)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port; -1 = off")
    p.add_argument("--engine", choices=("onnx", "eager"), default="onnx", help="onnx: ORT + batched LLM; eager: PyTorch baseline")
    p.add_argument("--runtime", choices=sorted(RUNTIME_PRESETS), default="cpu", help="runtime preset (threads, dtype, device)")
    p.add_argument("--llm-backend", choices=("vllm", "transformers"), default=None, help="override the preset's LLM backend")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default=None,
                   help="onnx engine: LLM precision (default: the runtime preset's; auto: bf16 on GPUs and CPUs "
                        "with native bf16, else fp32); eager engine: the whole model's precision (default float32)")
    p.add_argument("--eager-workers", type=int, default=None,
                   help="eager engine: single-thread workers, one utterance each (default: one per core)")
    p.add_argument("--graph-runtime", choices=("onnxruntime", "openvino", "auto"), default=None,
                   help="onnx engine: what runs the ONNX graphs (default: the preset's; cpu: auto = OpenVINO "
                        "in bf16 on CPUs with native bf16, else onnxruntime)")
    p.add_argument("--graph-workers", type=int, default=None,
                   help="onnx engine: threads running different batches' ONNX stages at once (default: the preset's)")
    p.add_argument("--audio-batching", choices=("padded", "per-utterance"), default=None,
                   help="onnx engine: the audio encoder on the zero-padded batch, or on each clip alone "
                        "(default: the preset's)")
    p.add_argument("--lone-batch", choices=("wide", "narrow"), default=None,
                   help="onnx engine on OpenVINO: a one-utterance batch that finds every compute slot free runs its "
                        "graphs on all the cores (wide) or on one (narrow) (default: the preset's)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="utterances per engine batch (default: the runtime preset's: cpu/test 8, cuda 64; "
                        "it also sizes vLLM's max_num_seqs)")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="onnx engine with vLLM: GPUs the LLM is sharded over (default: the runtime preset's, 1)")
    p.add_argument("--precision", dest="graph_precision", choices=("float32", "bfloat16", "int8", "auto"), default=None,
                   help="onnx engine: what OpenVINO computes the graphs in (default: the preset's; cpu: auto = the "
                        "LLM's dtype, or the bundle's int8 graphs where its CPU class was measured faster in int8); "
                        "int8 needs a bundle with the int8 variant recorded on (`emoq export --add-variant int8`)")
    p.add_argument("--audio-precision", choices=("float32", "float16", "auto"), default=None,
                   help="onnx engine: the fp32 or the fp16 audio graph (default auto: fp16 on CUDA when the bundle "
                        "was exported with --fp16)")
    p.add_argument("--max-queue-delay-ms", type=float, default=d.batcher.max_queue_delay_ms)
    p.add_argument("--length-buckets", type=length_buckets, default=None, metavar="EDGES",
                   help="audio-length buckets a batch is drawn from: ascending edges in seconds ('1,2,4,8'), "
                        "'one' (every length in one bucket) or 'default' (default: the runtime preset's, which on "
                        "the cpu preset follows this CPU class's plan)")
    p.add_argument("--max-inflight-batches", type=int, default=None,
                   help="batches in the engine at once (default: the runtime preset's, which on the cpu preset "
                        "follows this CPU class's plan)")
    p.add_argument("--queue-size", type=int, default=d.batcher.queue_size)
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds)
    p.add_argument("--max-transcript-tokens", type=int, default=d.max_transcript_tokens)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument("--interim-span-s", type=float, default=d.interim_span_s)
    p.add_argument("--stream-idle-timeout-s", type=float, default=d.stream_idle_timeout_s)
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="concurrent StreamingRecognize calls; more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-buffered-audio-s", type=float, default=d.max_buffered_audio_s,
                   help="seconds of audio all open streams may hold together; a stream past it gets RESOURCE_EXHAUSTED")
    p.add_argument("--max-stream-audio-s", type=float, default=d.max_stream_audio_s,
                   help="seconds of audio one stream may hold (its share of --max-buffered-audio-s)")
    p.add_argument("--max-unary-calls", type=int, default=d.max_unary_calls,
                   help="Recognize calls in progress at once (per bearer token when tokens are on); "
                        "more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-health-watches", type=int, default=d.max_health_watches,
                   help="open health Watch streams (they need no token); more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-stream-pending-segments", type=int, default=d.max_stream_pending_segments,
                   help="VOICE_ACTIVITY: closed segments of one stream in work at once; at the share the stream's "
                        "next message waits (back-pressure on a client sending faster than real time)")
    p.add_argument("--max-segment-s", type=float, default=d.max_segment_s,
                   help="VOICE_ACTIVITY: longest segment before a forced cut (clients may ask for less)")
    p.add_argument("--max-segment-transcript-wait-ms", type=int, default=d.max_segment_transcript_wait_ms,
                   help="VOICE_ACTIVITY: longest wait for a segment's client transcript after it closes")
    p.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s)
    p.add_argument("--engine-timeout-s", type=float, default=d.supervisor.engine_timeout_s,
                   help="a batch slower than this means a hung engine: fail it (UNAVAILABLE) and rebuild the engine")
    p.add_argument("--max-consecutive-failures", type=int, default=d.supervisor.max_consecutive_failures,
                   help="failed batches in a row before the engine is rebuilt")
    p.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM server key")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA for client certificates (mutual TLS)")
    p.add_argument("--auth-tokens-file", default=None, help="bearer tokens, one per line (also $EMOQ_AUTH_TOKENS)")
    p.add_argument("--asr", choices=ASR_MODES, default=d.asr,
                   help="speech recognition: auto = transcribe audio sent without a transcript (default); always = "
                        "replace client transcripts; off = run such audio audio-only (no ASR model loaded)")
    p.add_argument("--asr-model", default=None, metavar="DIR",
                   help="CTranslate2 Whisper folder (default: the bundled Whisper tiny.en)")
    p.add_argument("--asr-threads", type=int, default=d.asr_engine.threads, help="ASR (CTranslate2) threads")
    p.add_argument("--asr-queue-size", type=int, default=d.asr_engine.queue_size,
                   help="clips waiting for ASR; one more is refused at once (RESOURCE_EXHAUSTED)")
    p.add_argument("--asr-compute-type", default=d.asr_engine.compute_type,
                   help="CTranslate2 compute type: auto (int8 on CPU, float16 on CUDA), int8, float16, float32, ...")
    p.add_argument("--asr-window", choices=("fit", "full"), default=d.asr_engine.window,
                   help="encoder window: fit = the clip's length in whole seconds (at least --asr-min-window-s); "
                        "full = Whisper's 30 s")
    p.add_argument("--asr-min-window-s", type=float, default=d.asr_engine.min_window_s,
                   help="shortest encoder window under --asr-window fit")
    p.add_argument("--asr-beam-size", type=int, default=d.asr_engine.beam_size,
                   help="beam width while the ASR queue is short (1 = greedy)")
    p.add_argument("--asr-greedy-above-queue", type=int, default=d.asr_engine.greedy_above_queue,
                   help="decode greedily when more than this many clips wait (-1: always --asr-beam-size)")
    p.add_argument("--asr-max-batch", type=int, default=d.asr_engine.max_batch,
                   help="clips per ASR model call (default: 4 on CPU with --asr-window fit, 1 with full; 8 on CUDA)")
    cluster = p.add_argument_group("cluster mode: the engine as Ray Serve replicas (this process stays the front door)")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="run the engine on Ray: 'local' starts Ray on this machine, 'auto' joins the cluster "
                              "this machine belongs to, HOST:PORT joins the cluster of that head node")
    cluster.add_argument("--replicas", type=int, default=None, help="engine replicas (default 1)")
    cluster.add_argument("--min-replicas", type=int, default=None, help="autoscale between this and --max-replicas")
    cluster.add_argument("--max-replicas", type=int, default=None)
    cluster.add_argument("--replica-cpus", type=float, default=None,
                         help="Ray CPUs per replica (default: the runtime preset's threads)")
    cluster.add_argument("--replica-gpus", type=float, default=None,
                         help="Ray GPUs per replica (default: 1 with --device cuda, else 0)")
    cluster.add_argument("--serve-app", default=None, metavar="NAME",
                         help="Ray Serve application name; front doors naming the same one share its replicas "
                              "(default emoq)")
    cluster.add_argument("--replica-attempts", type=int, default=None,
                         help="sends of a batch whose replica died, hung or failed it: 2 = one retry on another "
                              "replica (default), 1 = none")
    cluster.add_argument("--cluster-lost-timeout-s", type=float, default=None,
                         help="Ray Serve unreachable this long = the cluster is lost: drain and exit with status 3 "
                              "(default 30)")
    p.add_argument("--vllm-kv-cache-mib", type=int, default=None,
                   help="vLLM's KV cache on CPU in MiB (default: the runtime preset's)")
    p.add_argument("--no-verify", action="store_true",
                   help="UNSAFE: skip the bundle's sha256 checks (serves files nobody verified; logged as a warning)")
    p.set_defaults(func=run)


def length_buckets(text: str) -> tuple[float, ...]:
    """--length-buckets: 'default', 'one' or ascending edges in seconds ('1,2,4')."""
    if text == "default":
        return DEFAULT_BUCKET_EDGES_S
    if text == "one":
        return ()
    try:
        edges = tuple(float(e) for e in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'one', 'default' or edges in seconds like '1,2,4'") from None
    if list(edges) != sorted(edges) or any(e <= 0 for e in edges):
        raise argparse.ArgumentTypeError(f"{text!r}: bucket edges must be positive and ascending")
    return edges


def configs(args: argparse.Namespace) -> tuple[RuntimeConfig, ServerConfig]:
    """The parsed flags as (RuntimeConfig, ServerConfig)."""
    runtime = runtime_preset(args.runtime).replace(
        verify_hashes=not args.no_verify,
        **{k: v for k in ("llm_backend", "device", "dtype", "graph_runtime", "graph_workers", "eager_workers", "max_batch",
                          "vllm_kv_cache_mib", "tensor_parallel_size", "audio_precision", "graph_precision")
           if (v := getattr(args, k, None)) is not None},
    )
    if args.audio_batching is not None:
        runtime = runtime.replace(audio_per_utterance=args.audio_batching == "per-utterance")
    if args.lone_batch is not None:
        runtime = runtime.replace(lone_batch_wide=args.lone_batch == "wide")
    if args.engine == "eager" and args.dtype is None:  # the baseline is fp32 unless asked, whatever the preset says
        runtime = runtime.replace(dtype="float32")
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    try:
        server = ServerConfig(
            **{k: v for k, v in vars(args).items() if k in fields},
            # The batcher and the engine agree on one batch size.
            batcher=BatcherConfig(max_batch=runtime.max_batch, max_queue_delay_ms=args.max_queue_delay_ms,
                                  queue_size=args.queue_size,
                                  max_inflight_batches=args.max_inflight_batches or runtime.inflight_batches,
                                  **bucket_edges(args.length_buckets, runtime.bucket_edges_s)),
            supervisor=SupervisorConfig(engine_timeout_s=args.engine_timeout_s,
                                        max_consecutive_failures=args.max_consecutive_failures),
            asr_engine=AsrConfig(model_dir=args.asr_model, threads=args.asr_threads, compute_type=args.asr_compute_type,
                                 queue_size=args.asr_queue_size, window=args.asr_window,
                                 min_window_s=args.asr_min_window_s, beam_size=args.asr_beam_size,
                                 greedy_above_queue=None if args.asr_greedy_above_queue == -1 else args.asr_greedy_above_queue,
                                 max_batch=args.asr_max_batch),
        )
    except ValueError as exc:  # a setting to fix (half a TLS configuration, a bad limit)
        raise SystemExit(f"emoq serve: {exc}") from None
    if server.metrics_port is not None and server.metrics_port < 0:
        server = server.replace(metrics_port=None)
    return runtime, server.replace(cluster=cluster_config(args))


#: `emoq serve` flags -> `ClusterConfig` fields (a flag left unset keeps the field's default).
CLUSTER_FLAGS = {"replicas": "replicas", "min_replicas": "min_replicas", "max_replicas": "max_replicas",
                 "replica_cpus": "replica_cpus", "replica_gpus": "replica_gpus", "serve_app": "app_name",
                 "replica_attempts": "attempts", "cluster_lost_timeout_s": "lost_timeout_s"}


def cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The cluster flags as a `ClusterConfig`; None without --ray-address (they need it)."""
    given = {field: v for flag, field in CLUSTER_FLAGS.items() if (v := getattr(args, flag, None)) is not None}
    if getattr(args, "ray_address", None) is None:
        if given:
            flags = ", ".join("--" + flag.replace("_", "-") for flag in CLUSTER_FLAGS if getattr(args, flag) is not None)
            raise SystemExit(f"emoq serve: {flags} need --ray-address (local, auto or HOST:PORT)")
        return None
    try:
        # Each replica's watchdog reports a hung engine after the engine timeout; a send unanswered
        # for twice that (the replica itself lost) is given up on too.
        return ClusterConfig(ray_address=args.ray_address, call_timeout_s=2 * args.engine_timeout_s, **given)
    except ValueError as exc:
        raise SystemExit(f"emoq serve: {exc}") from None


def bundle_path(args: argparse.Namespace) -> str:
    """--bundle, or the demo bundle (built on first use by the demo package)."""
    if args.bundle:
        return args.bundle
    from emoq_serve.demo_bundle import default_bundle_path

    try:
        return str(default_bundle_path())
    except RuntimeError as exc:
        raise SystemExit(f"no --bundle given and no demo bundle: {exc}") from exc


def ports_in_use(host: str, ports: list[int | None]) -> list[int]:
    """The fixed ports (not 0, not off) a server could not bind on `host` right now."""
    import errno
    import socket

    host = host.strip("[]")  # gRPC's "[::]"
    taken = []
    for port in (p for p in ports if p):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # As the servers bind: a port left in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:  # anything but "in use" (a bad host) is the server's to report
                if exc.errno == errno.EADDRINUSE:
                    taken.append(port)
    return taken


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import os

    from emoq_serve.server.app import EXIT_CLUSTER_LOST, serve_bundle

    runtime, server = configs(args)
    # Before the minutes of model loading, not after them.
    if taken := ports_in_use(server.host, [server.port, server.metrics_port]):
        raise SystemExit(f"emoq serve: port {', '.join(map(str, taken))} on {server.host} is already in use: stop "
                         "what listens there or pick another --port / --metrics-port (0 = any free port)")
    if not runtime.verify_hashes:
        logging.getLogger(__name__).warning(
            "--no-verify: the bundle's files are NOT checked against its manifest hashes; a corrupted or "
            "tampered bundle will be served. Use only for bundles you built on this machine."
        )
    from emoq_serve.speech.asr import AsrError

    try:
        code = asyncio.run(serve_bundle(bundle_path(args), runtime, server, args.engine))
    except AsrError as exc:  # a bad --asr-model is a setting to fix, not a crash to debug
        raise SystemExit(f"emoq serve: {exc}") from None
    if code == EXIT_CLUSTER_LOST:  # drained; Ray's exit hooks would wait on (or crash over) the lost cluster
        logging.shutdown()
        os._exit(code)
    return code
