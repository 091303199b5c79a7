"""One `emoq bench` run: workload, matmul peak, each engine's sweep, FLOPs, the report.

Order matters on a small shared machine: the matmul peak is measured before any server starts
(nothing of ours competes for the cores), and engines run one after the other on the same
seeded workload, each in its own freshly started server, so the engine is the only difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import conversation, flops, report, stats, threads
from benchmarks.config import BASELINES, ENGINE_FLAGS, BenchConfig
from benchmarks.loadgen import run_closed, run_open
from benchmarks.server_proc import ServerProcess
from emoq_serve.engine.batcher import BATCH_TRACE_ENV
from benchmarks.target import make_call
from benchmarks.workload import BenchRequest, make_workload
from emoq_serve.executors.types import STAGES

#: Whether an engine's per-request stage timings are the wall time of the whole batch (the
#: batched ONNX pipeline) or of that request alone (the eager engine runs a batch one by one).
TIMINGS_COVER_BATCH = {"onnx": True, "eager": False, "eager-bf16": False}

#: Thread-pool environment variables worth recording (they change what a server does).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
              "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")


def measure_peaks(seconds: float) -> dict[str, dict[str, Any]]:
    """fp32 and bf16, each on 1 thread and on all cores (engines compute in either)."""
    cores = os.cpu_count() or 1
    runs = {f"{d}_{t}t": (t, dtype) for d, dtype in (("fp32", "float32"), ("bf16", "bfloat16"))
            for t in dict.fromkeys((1, cores))}
    return {name: asdict(flops.matmul_peak(t, dtype, seconds=seconds)) for name, (t, dtype) in runs.items()}


def efficiency_peak(peaks: dict[str, dict[str, Any]], engine: str, info: dict[str, Any],
                    runtime: dict[str, Any] | None) -> str:
    """The matmul peak an engine's encoder stages are held against: its precision (bf16 for the
    bf16 eager baseline and for graphs OpenVINO runs in bf16) at its thread count per stage."""
    versions = info.get("versions", {})
    bf16 = versions.get("dtype") == "bfloat16" and (engine == "eager-bf16" or versions.get("graph_runtime") == "openvino")
    threads = 1 if engine.startswith("eager") or runtime is None else runtime["runtime"]["audio_threads"]
    name = f"{'bf16' if bf16 else 'fp32'}_{threads}t"
    return name if name in peaks else max((k for k in peaks if k.startswith("fp32")), key=lambda k: peaks[k]["gflops"])


def workload_flops(bundle_path: Path, workload: list[BenchRequest], prefix_block: int = 0) -> dict[str, float]:
    """Mean FLOPs per request per stage over the workload, with the bundle's own tokenizers
    (transcript tokens for the former, the full chat prompt for the LLM). `prefix_block`: the
    KV-block size of an LLM engine with a prefix cache (0: none), whose cached template blocks
    are not computed again."""
    from transformers import AutoTokenizer

    from emoq_serve.bundle import FORMER_TOKENIZER_DIR, Bundle
    from emoq_serve.executors.heads import prompt_builder

    bundle = Bundle.open(bundle_path, verify_hashes=False)
    cfg = bundle.model_config
    text_tokenizer = AutoTokenizer.from_pretrained(str(bundle.file(FORMER_TOKENIZER_DIR)))
    builder = prompt_builder(bundle) if bundle.head == "llm" else None
    prompts = [builder.encode(req.transcript, req.speaker)[0] for req in workload] if builder is not None else []
    cached = flops.cached_prefix_tokens(prompts, prefix_block)
    per_request = []
    for i, req in enumerate(workload):
        shape = flops.RequestShape(
            samples=len(req.audio),
            text_tokens=len(text_tokenizer(req.transcript, truncation=True,
                                           max_length=cfg.former.max_text_tokens)["input_ids"]),
            prompt_tokens=len(prompts[i]) if prompts else None,
            cached_tokens=cached,
        )
        per_request.append(flops.request_flops(cfg, shape))
    return {stage: float(np.mean([f[stage] for f in per_request])) for stage in per_request[0]}


def prefix_block(runtime: dict[str, Any] | None, engine: str) -> int:
    """The KV-block size of the engine's prefix cache: the onnx engine's vLLM backend caches
    the template's whole blocks; the eager baseline's transformers forward caches nothing."""
    if engine != "onnx" or runtime is None or runtime["runtime"]["llm_backend"] != "vllm":
        return 0
    return int(runtime["runtime"]["vllm_block_size"])


def server_runtime(cfg: BenchConfig, engine: str) -> dict[str, Any]:
    """The RuntimeConfig and ServerConfig a harness-started server runs with, parsed by the
    server's own CLI code from the same flags, so the report states its real thread settings."""
    import argparse

    from emoq_serve.server.cli import configs, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--bundle", str(cfg.bundle), *ENGINE_FLAGS[engine], *cfg.serve_args.split()])
    runtime, server = configs(args)
    return {"runtime": asdict(runtime), "batching": asdict(server.batcher)}


@dataclass
class Endpoint:
    """The server one engine's sweep measures: where to call it, scrape it, sample its threads,
    and the batch trace its batcher writes (None for a server the harness did not start)."""

    address: str
    metrics_url: str | None
    pid: int | None
    batch_trace: Path | None = None


@contextlib.contextmanager
def endpoint(cfg: BenchConfig, engine: str, repeat: int = 0) -> Iterator[Endpoint]:
    """The server to measure; started (and stopped) here unless `cfg.server` names one."""
    if cfg.server is not None:
        yield Endpoint(cfg.server, cfg.metrics_url, cfg.server_pid)
        return
    suffix = f"-r{repeat}" if cfg.repeats > 1 else ""
    trace = cfg.out / f"batches-{engine}{suffix}.jsonl"
    trace.unlink(missing_ok=True)
    with ServerProcess(bundle=cfg.bundle, engine=engine, log_path=cfg.out / f"server-{engine}{suffix}.log",
                       extra_args=cfg.serve_args, env={BATCH_TRACE_ENV: str(trace)}) as server:
        yield Endpoint(server.address, server.metrics_url, server.pid, trace)


def _scrape(url: str | None) -> dict[str, float]:
    return stats.scrape_metrics(url) if url else {}


async def sweep(cfg: BenchConfig, engine: str, server: Endpoint, workload: list[BenchRequest],
                repeat: int = 0) -> tuple[dict[str, Any], list[stats.LoadPoint]]:
    """All load points of one engine; returns (GetModelInfo as a dict, the points). Each point
    also records the server's CPU use per thread group and, from its batch trace, the batches."""
    from tqdm import tqdm

    from emoq_serve.client.api import EmotionClient

    # No client retries: a refused or failed call is counted as the server answered it, not
    # hidden behind a retry's backoff in the latency figures.
    async with EmotionClient(server.address, timeout=cfg.timeout_s, retries=0) as client:
        info = await client.model_info()
        call = make_call(client, cfg.api, cfg.timeout_s, cfg.chunk_ms, cfg.realtime)
        loads = cfg.concurrency if cfg.mode == "closed" else cfg.rates
        points = []
        for load in loads:
            label = f"{engine} {'c=' if cfg.mode == 'closed' else 'rate='}{load}"
            before: dict[str, float] = {}
            mark: dict[str, Any] = {}

            def scrape_before() -> None:  # after warm-up, so its batches and CPU time do not count
                before.update(_scrape(server.metrics_url))
                mark.update(t=time.monotonic(), threads=threads.sample(server.pid) if server.pid else {})

            with tqdm(total=cfg.budget.requests, desc=label, unit="req", file=sys.stderr) as bar:
                if cfg.mode == "closed":
                    run = await run_closed(call, workload, int(load), cfg.budget, lambda r: bar.update(1),
                                           scrape_before)
                else:
                    run = await run_open(call, workload, float(load), cfg.budget, cfg.seed, lambda r: bar.update(1),
                                         scrape_before)
                end = time.monotonic()
                after = _scrape(server.metrics_url)
                cpu = threads.busy(mark["threads"], threads.sample(server.pid), end - mark["t"]) if server.pid else None
            point = stats.summarize(
                run, engine=engine, mode=cfg.mode, api=cfg.api,
                concurrency=int(load) if cfg.mode == "closed" else None,
                rate=float(load) if cfg.mode == "open" else None,
                mean_batch_size=stats.mean_batch_size(before, after),
            )
            point.repeat = repeat
            point.extra["server_cpu"] = cpu
            point.extra["batches"] = stats.batch_trace(server.batch_trace, mark["t"], end) \
                if server.batch_trace else None
            points.append(point)
    return info_dict(info), points


def info_dict(info) -> dict[str, Any]:
    """The report's copy of a GetModelInfoResponse."""
    return {"labels": list(info.labels), "bundle_id": info.bundle_id, "preset": info.preset,
            "sample_rate_hz": info.sample_rate_hz, "versions": dict(info.versions)}


async def conversation_sweep(cfg: BenchConfig, engine: str, address: str, pid: int | None,
                             conversations: list) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from emoq_serve.client.api import EmotionClient

    async with EmotionClient(address, timeout=cfg.timeout_s, retries=0) as client:
        info = await client.model_info()
        points = await conversation.sweep(
            client, engine, conversations, cfg.concurrency, chunk_ms=cfg.chunk_ms, realtime=cfg.realtime,
            client_transcripts=cfg.client_transcripts, timeout_s=cfg.timeout_s, server_pid=pid,
            latency_bound_ms=cfg.latency_bound_ms, max_slope_ms_per_min=cfg.max_slope_ms_per_min,
            progress=lambda line: print(line, file=sys.stderr, flush=True))
    return info_dict(info), points


def run_conversation_bench(cfg: BenchConfig) -> dict[str, Any]:
    """`--api conversation`: one generated conversation per stream (seeds seed, seed+1, ...), each
    stream count of `cfg.concurrency` in turn, per engine; the report says how many streams each
    engine sustains."""
    from emoq_serve.data.conversation import make_conversation

    cfg.out.mkdir(parents=True, exist_ok=True)
    machine = report.machine_description()
    conversations = [make_conversation(seconds=cfg.conversation_seconds, seed=cfg.seed + i)
                     for i in range(max(cfg.concurrency))]
    points, infos = [], {}
    threads: dict[str, Any] = {"env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}}
    for engine in cfg.engines:
        if cfg.server is None:
            threads[engine] = server_runtime(cfg, engine)
        with endpoint(cfg, engine) as server:
            infos[engine], engine_points = asyncio.run(
                conversation_sweep(cfg, engine, server.address, server.pid, conversations))
        points += engine_points
    first = next(iter(infos.values()))
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command, "bundle_id": first["bundle_id"], "preset": first["preset"],
        "machine": machine, "load_average_end": list(os.getloadavg()), "threads": threads,
        "versions": {"bench": report.library_versions(), **{f"server_{e}": i["versions"] for e, i in infos.items()}},
        "model_info": infos, "api": "conversation",
        "conversation": {"seconds": cfg.conversation_seconds, "seeds": [cfg.seed, cfg.seed + len(conversations) - 1],
                         "turns_per_stream": float(np.mean([len(c.turns) for c in conversations])),
                         "chunk_ms": cfg.chunk_ms, "realtime": cfg.realtime,
                         "transcripts": "client" if cfg.client_transcripts else "server (ASR when on)",
                         "latency_bound_ms": cfg.latency_bound_ms, "max_slope_ms_per_min": cfg.max_slope_ms_per_min},
        "points": points,
        "sustained_streams": conversation.sustained_streams(points),
        "notes": [],
    }
    if not cfg.realtime:
        result["notes"].append("streams were not paced in real time (--realtime not given): latency and "
                               "sustained streams describe a burst, not live conversations")
    if machine["load_average"][0] > 0.5 * (machine["logical_cores"] or 1):
        result["notes"].append(f"other processes were loading the machine when this run started (1-min load "
                               f"average {machine['load_average'][0]:.2f} on {machine['logical_cores']} cores)")
    report.write(result, cfg.out)
    return result


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run everything `cfg` asks for and return the report (also written to `cfg.out`)."""
    if cfg.api == "conversation":
        return run_conversation_bench(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    machine = report.machine_description()
    workload = make_workload(cfg.workload)
    peaks = measure_peaks(cfg.peak_seconds)
    # The best fp32 rate measured: under contention two threads can lose to one (ARCHITECTURE.md).
    peak_fp32 = max(p["gflops"] for p in peaks.values() if p["dtype"] == "float32")
    points, infos = [], {}
    settings: dict[str, Any] = {"env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
                                "bench_torch_threads_for_peaks": [1, os.cpu_count()]}
    if cfg.server is None:
        settings.update({engine: server_runtime(cfg, engine) for engine in cfg.engines})
    per_request = workload_flops(cfg.bundle, workload) if cfg.bundle else {}
    # What each engine computes: the model's FLOPs less the LLM prefix its cache serves.
    per_engine = {engine: workload_flops(cfg.bundle, workload, prefix_block(settings.get(engine), engine))
                  for engine in cfg.engines} if cfg.bundle else {}
    for repeat in range(cfg.repeats):
        # Engines take turns within each repeat, starting one later each time, so a slow drift of
        # the machine (another job, heat) lands on every engine alike.
        order = cfg.engines[repeat % len(cfg.engines):] + cfg.engines[:repeat % len(cfg.engines)]
        for engine in order:
            with endpoint(cfg, engine, repeat) as server:
                infos[engine], engine_points = asyncio.run(sweep(cfg, engine, server, workload, repeat))
            peak = efficiency_peak(peaks, engine, infos[engine], settings.get(engine))
            for point in engine_points:
                if per_request:
                    point.extra["efficiency_peak"] = peak
                    point.extra["efficiency"] = flops.stage_efficiency(
                        per_engine[engine], point.server_ms,
                        (point.mean_batch_size or 1.0) if TIMINGS_COVER_BATCH[engine] else 1.0,
                        peaks[peak]["gflops"])
                points.append(point.to_dict())
    summary = stats.median_points(points)
    first = next(iter(infos.values()))
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command,
        "bundle_id": first["bundle_id"],
        "preset": first["preset"],
        "machine": machine,
        "load_average_end": list(os.getloadavg()),
        "threads": settings,
        "versions": {"bench": report.library_versions(), **{f"server_{e}": i["versions"] for e, i in infos.items()}},
        "model_info": infos,
        "repeats": cfg.repeats,
        "mode": cfg.mode,
        "api": cfg.api,
        "stream": {"chunk_ms": cfg.chunk_ms, "realtime": cfg.realtime} if cfg.api == "stream" else None,
        "budget": asdict(cfg.budget),
        "workload": {**asdict(cfg.workload), "mean_seconds": float(np.mean([r.seconds for r in workload]))},
        "peak_gflops": peaks,
        "peak_fp32_gflops": peak_fp32,
        "flops_per_request": per_request,
        "flops_per_request_computed": per_engine,
        "stages": list(STAGES),
        "points": points,
        "summary": summary,
        "ratios": {b: report.ratios(summary, baseline=b, runs=points)
                   for b in BASELINES if {b, "onnx"} <= set(cfg.engines)},
        "notes": [],
    }
    if machine["load_average"][0] > 0.5 * (machine["logical_cores"] or 1):
        result["notes"].append(f"other processes were loading the machine when this run started (1-min load "
                               f"average {machine['load_average'][0]:.2f} on {machine['logical_cores']} cores): "
                               "absolute numbers are pessimistic; same-run ratios are less affected")
    report.write(result, cfg.out)
    return result
