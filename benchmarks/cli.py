"""`emoq bench`: flags -> `BenchConfig` -> `runner.run_bench` (imports stay lazy until it runs)."""

from __future__ import annotations

import argparse
import shlex

from benchmarks.config import ENGINES


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def canonical_command(args: argparse.Namespace) -> str:
    """The run as a full `emoq bench` command line (every option spelled out), for the report:
    it reproduces the run whatever defaults a later version has."""
    words = ["emoq", "bench"]
    for name, value in vars(args).items():
        if name in ("func", "command", "verbose") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, tuple) else str(value)
            words += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
    return shlex.join(words)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency/throughput benchmark against a server or a bundle (perf_analyzer-style)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--server", default=None, help="host:port of a running `emoq serve`")
    target.add_argument("--bundle", default=None, help="bundle folder: the harness serves it itself, per engine")
    p.add_argument("--flops-bundle", default=None,
                   help="with --server: the served bundle, read for FLOPs estimates and tokenizers")
    p.add_argument("--metrics-url", default=None, help="with --server: its Prometheus endpoint (mean batch size)")
    p.add_argument("--engine", choices=(*ENGINES, "both"), default="onnx",
                   help="both = eager fp32, eager bf16, then onnx on the same workload, with onnx/eager ratios")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=_ints, default=(1, 2, 4, 8, 16),
                   help="closed loop, comma list (1,2,4,8,16,32); with --api conversation: concurrent streams")
    p.add_argument("--rate", type=_floats, default=(1.0,), help="open loop: requests/s, comma list")
    p.add_argument("--api", choices=("unary", "stream", "conversation"), default="unary",
                   help="conversation: concurrent VOICE_ACTIVITY streams of generated conversations, "
                        "segment latency and the real-time streams sustained")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="stream chunk length")
    p.add_argument("--realtime", action="store_true", help="stream chunks at the audio's own pace")
    conv = p.add_argument_group("--api conversation")
    conv.add_argument("--conversation-seconds", type=float, default=180.0, help="length of each stream's conversation")
    conv.add_argument("--asr-transcripts", action="store_true",
                      help="send no transcripts: the server's ASR (when on) supplies them")
    conv.add_argument("--latency-bound-ms", type=float, default=3000.0,
                      help="sustained: p95 segment latency (end of speech -> result) below this")
    conv.add_argument("--max-slope-ms-per-min", type=float, default=500.0,
                      help="sustained: segment latency grows by less than this per minute of stream")
    conv.add_argument("--server-pid", type=int, default=None, help="with --server: its pid, to sample its memory")
    p.add_argument("--warmup", type=int, default=4, help="discarded requests before each load point")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--requests", type=int, default=None, help="measured requests per load point")
    budget.add_argument("--duration", type=float, default=None, help="seconds per load point (default 30)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every engine's load points this many times, engines taking turns; "
                        "the report gives medians, the spread (min-max) and same-run ratios")
    p.add_argument("--utterances", type=int, default=64, help="workload size (cycled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help='extra `emoq serve` flags, e.g. --serve-args="--max-batch 16"')
    p.add_argument("--timeout", type=float, default=300.0, help="per-call deadline (s)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="time per matmul-peak measurement")
    p.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.md, bench.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmarks.config import BenchConfig
    from benchmarks.loadgen import Budget
    from benchmarks.report import markdown
    from benchmarks.runner import run_bench
    from benchmarks.workload import WorkloadConfig

    cfg = BenchConfig(
        server=args.server,
        bundle=Path(args.bundle or args.flops_bundle) if (args.bundle or args.flops_bundle) else None,
        engines=ENGINES if args.engine == "both" else (args.engine,),
        mode=args.mode, concurrency=args.concurrency, rates=args.rate, api=args.api,
        chunk_ms=args.chunk_ms, realtime=args.realtime,
        budget=Budget(requests=args.requests, duration_s=None if args.requests else (args.duration or 30.0),
                      warmup=args.warmup),
        repeats=args.repeats,
        seed=args.seed, workload=WorkloadConfig(num_utterances=args.utterances, seed=args.seed),
        out=Path(args.out), serve_args=args.serve_args, metrics_url=args.metrics_url,
        timeout_s=args.timeout, peak_seconds=args.peak_seconds,
        conversation_seconds=args.conversation_seconds, client_transcripts=not args.asr_transcripts,
        latency_bound_ms=args.latency_bound_ms, max_slope_ms_per_min=args.max_slope_ms_per_min,
        server_pid=args.server_pid,
        command=canonical_command(args),
    )
    print(markdown(run_bench(cfg)))
    print(f"wrote {cfg.out}/bench.json, bench.md, bench.png")
    return 0
