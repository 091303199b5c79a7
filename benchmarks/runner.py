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
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import conversation, flops, report, stats
from benchmarks.config import BASELINES, ENGINE_FLAGS, BenchConfig
from benchmarks.loadgen import run_closed, run_open
from benchmarks.server_proc import ServerProcess
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


def workload_flops(bundle_path: Path, workload: list[BenchRequest]) -> dict[str, float]:
    """Mean FLOPs per request per stage over the workload, with the bundle's own tokenizers
    (transcript tokens for the former, the full chat prompt for the LLM)."""
    from transformers import AutoTokenizer

    from emoq_serve.bundle import FORMER_TOKENIZER_DIR, Bundle
    from emoq_serve.executors.heads import prompt_builder

    bundle = Bundle.open(bundle_path, verify_hashes=False)
    cfg = bundle.model_config
    text_tokenizer = AutoTokenizer.from_pretrained(str(bundle.file(FORMER_TOKENIZER_DIR)))
    builder = prompt_builder(bundle) if bundle.head == "llm" else None
    per_request = []
    for req in workload:
        shape = flops.RequestShape(
            samples=len(req.audio),
            text_tokens=len(text_tokenizer(req.transcript, truncation=True,
                                           max_length=cfg.former.max_text_tokens)["input_ids"]),
            prompt_tokens=len(builder.encode(req.transcript, req.speaker)[0]) if builder is not None else None,
        )
        per_request.append(flops.request_flops(cfg, shape))
    return {stage: float(np.mean([f[stage] for f in per_request])) for stage in per_request[0]}


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


@contextlib.contextmanager
def endpoint(cfg: BenchConfig, engine: str) -> Iterator[tuple[str, str | None, int | None]]:
    """(gRPC address, metrics URL, pid) of the server to measure; starts and stops it if needed."""
    if cfg.server is not None:
        yield cfg.server, cfg.metrics_url, cfg.server_pid
        return
    with ServerProcess(bundle=cfg.bundle, engine=engine, log_path=cfg.out / f"server-{engine}.log",
                       extra_args=cfg.serve_args) as server:
        yield server.address, server.metrics_url, server.pid


def _scrape(url: str | None) -> dict[str, float]:
    return stats.scrape_metrics(url) if url else {}


async def sweep(cfg: BenchConfig, engine: str, address: str, metrics_url: str | None,
                workload: list[BenchRequest]) -> tuple[dict[str, Any], list[stats.LoadPoint]]:
    """All load points of one engine; returns (GetModelInfo as a dict, the points)."""
    from tqdm import tqdm

    from emoq_serve.client.api import EmotionClient

    # No client retries: a refused or failed call is counted as the server answered it, not
    # hidden behind a retry's backoff in the latency figures.
    async with EmotionClient(address, timeout=cfg.timeout_s, retries=0) as client:
        info = await client.model_info()
        call = make_call(client, cfg.api, cfg.timeout_s, cfg.chunk_ms, cfg.realtime)
        loads = cfg.concurrency if cfg.mode == "closed" else cfg.rates
        points = []
        for load in loads:
            label = f"{engine} {'c=' if cfg.mode == 'closed' else 'rate='}{load}"
            before: dict[str, float] = {}

            def scrape_before() -> None:  # after warm-up, so its batches do not count
                before.update(_scrape(metrics_url))

            with tqdm(total=cfg.budget.requests, desc=label, unit="req", file=sys.stderr) as bar:
                if cfg.mode == "closed":
                    run = await run_closed(call, workload, int(load), cfg.budget, lambda r: bar.update(1),
                                           scrape_before)
                else:
                    run = await run_open(call, workload, float(load), cfg.budget, cfg.seed, lambda r: bar.update(1),
                                         scrape_before)
                after = _scrape(metrics_url)
            points.append(stats.summarize(
                run, engine=engine, mode=cfg.mode, api=cfg.api,
                concurrency=int(load) if cfg.mode == "closed" else None,
                rate=float(load) if cfg.mode == "open" else None,
                mean_batch_size=stats.mean_batch_size(before, after),
            ))
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
        with endpoint(cfg, engine) as (address, _, pid):
            infos[engine], engine_points = asyncio.run(conversation_sweep(cfg, engine, address, pid, conversations))
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
    per_request = workload_flops(cfg.bundle, workload) if cfg.bundle else {}
    # The best fp32 rate measured: under contention two threads can lose to one (ARCHITECTURE.md).
    peak_fp32 = max(p["gflops"] for p in peaks.values() if p["dtype"] == "float32")
    points, infos, threads = [], {}, {"env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
                                      "bench_torch_threads_for_peaks": [1, os.cpu_count()]}
    for engine in cfg.engines:
        if cfg.server is None:
            threads[engine] = server_runtime(cfg, engine)
        with endpoint(cfg, engine) as (address, metrics_url, _):
            infos[engine], engine_points = asyncio.run(sweep(cfg, engine, address, metrics_url, workload))
        peak = efficiency_peak(peaks, engine, infos[engine], threads.get(engine))
        for point in engine_points:
            if per_request:
                point.extra["efficiency_peak"] = peak
                point.extra["efficiency"] = flops.stage_efficiency(
                    per_request, point.server_ms,
                    (point.mean_batch_size or 1.0) if TIMINGS_COVER_BATCH[engine] else 1.0, peaks[peak]["gflops"])
            points.append(point.to_dict())
    first = next(iter(infos.values()))
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command,
        "bundle_id": first["bundle_id"],
        "preset": first["preset"],
        "machine": machine,
        "load_average_end": list(os.getloadavg()),
        "threads": threads,
        "versions": {"bench": report.library_versions(), **{f"server_{e}": i["versions"] for e, i in infos.items()}},
        "model_info": infos,
        "mode": cfg.mode,
        "api": cfg.api,
        "stream": {"chunk_ms": cfg.chunk_ms, "realtime": cfg.realtime} if cfg.api == "stream" else None,
        "budget": asdict(cfg.budget),
        "workload": {**asdict(cfg.workload), "mean_seconds": float(np.mean([r.seconds for r in workload]))},
        "peak_gflops": peaks,
        "peak_fp32_gflops": peak_fp32,
        "flops_per_request": per_request,
        "stages": list(STAGES),
        "points": points,
        "ratios": {b: report.ratios(points, baseline=b) for b in BASELINES if {b, "onnx"} <= set(cfg.engines)},
        "notes": [],
    }
    if machine["load_average"][0] > 0.5 * (machine["logical_cores"] or 1):
        result["notes"].append(f"other processes were loading the machine when this run started (1-min load "
                               f"average {machine['load_average'][0]:.2f} on {machine['logical_cores']} cores): "
                               "absolute numbers are pessimistic; same-run ratios are less affected")
    report.write(result, cfg.out)
    return result
