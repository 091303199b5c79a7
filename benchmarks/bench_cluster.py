"""Throughput of one engine replica against two on Ray Serve, behind one `emoq serve` front door.

Run (on an otherwise idle machine; committed figures: `benchmarks/results/cluster/`):
  python -m benchmarks.bench_cluster --bundle DIR [--replicas 1,2] [--concurrency 4,8,16]
      [--duration 30] [--replica-cpus 1] [--ray-address local] [--out benchmarks/results/cluster]

Each replica count is one `emoq bench` run (`benchmarks.runner.run_bench`) on the same seeded
workload against a front door the harness starts with `--ray-address ADDR --replicas N`; the
report (`cluster.json`, `cluster.md`) holds each run's load points and the ratio of the best
throughput with N replicas to the one-replica figure. On one machine the replicas share its cores
with each other and the front door, so the ratio is what a second replica adds on *this* box; on
a real cluster run the same command with `--ray-address HEAD:6379` and one replica per node.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks.config import BenchConfig
from benchmarks.loadgen import Budget
from benchmarks.report import library_versions, machine_description
from benchmarks.runner import run_bench
from benchmarks.workload import WorkloadConfig

RESULTS_DIR = Path(__file__).parent / "results" / "cluster"


def best_throughput(report: dict[str, Any]) -> dict[str, Any]:
    """The load point with the most utterances per second (every call OK counted)."""
    point = max(report["points"], key=lambda p: p["throughput_utt_s"])
    return {"concurrency": point["concurrency"], "throughput_utt_s": point["throughput_utt_s"],
            "throughput_audio_s_s": point["throughput_audio_s_s"], "p50_ms": point["latency_ms"].get("p50"),
            "errors": point["errors"]}


def serve_args(args: argparse.Namespace, replicas: int) -> str:
    words = ["--ray-address", args.ray_address, "--replicas", str(replicas), "--serve-app", f"bench-{replicas}",
             *shlex.split(args.serve_args)]
    if args.replica_cpus is not None:
        words += ["--replica-cpus", f"{args.replica_cpus:g}"]
    return shlex.join(words)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    runs: dict[str, Any] = {}
    for replicas in args.replicas:
        cfg = BenchConfig(
            bundle=Path(args.bundle), engines=("onnx",), mode="closed", concurrency=args.concurrency, api=args.api,
            budget=Budget(requests=None, duration_s=args.duration, warmup=args.warmup),
            workload=WorkloadConfig(num_utterances=args.utterances, seed=args.seed), seed=args.seed,
            out=out / f"replicas-{replicas}", serve_args=serve_args(args, replicas), timeout_s=args.timeout,
            peak_seconds=args.peak_seconds,
            command=f"emoq bench --bundle {args.bundle} --serve-args={shlex.quote(serve_args(args, replicas))}",
        )
        report = run_bench(cfg)
        runs[str(replicas)] = {"serve_args": cfg.serve_args, "best": best_throughput(report),
                               "points": report["points"], "notes": report["notes"]}
    base = runs[str(args.replicas[0])]["best"]["throughput_utt_s"]
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_cluster " + shlex.join(args.argv),
        "machine": machine_description(), "load_average_end": list(os.getloadavg()),
        "versions": library_versions(),
        "runs": runs,
        "ratio_to_first": {n: (r["best"]["throughput_utt_s"] / base if base else None) for n, r in runs.items()},
        "caveat": "replicas on one machine share its cores: the ratio is what extra replicas add on this box, "
                  "not on a cluster with a node per replica",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(result, indent=2))
    (out / "cluster.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| replicas | best utt/s | at concurrency | p50 ms | audio s/s | vs first |", "|---|---|---|---|---|---|"]
    for n, r in result["runs"].items():
        b = result["runs"][n]["best"]
        ratio = result["ratio_to_first"][n]
        lines.append(f"| {n} | {b['throughput_utt_s']:.2f} | {b['concurrency']} | {b['p50_ms'] or float('nan'):.0f} | "
                     f"{b['throughput_audio_s_s']:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    machine = result["machine"]
    lines += ["", f"Command: `{result['command']}`", "",
              f"Machine: {machine.get('cpu_model', '?')}, {machine.get('logical_cores', '?')} logical cores, "
              f"load average at start {machine.get('load_average', ['?'])[0]}.", "", f"Caveat: {result['caveat']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--replicas", type=lambda t: tuple(int(x) for x in t.split(",")), default=(1, 2))
    p.add_argument("--concurrency", type=lambda t: tuple(int(x) for x in t.split(",")), default=(4, 8, 16))
    p.add_argument("--api", choices=("unary", "stream"), default="unary")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per load point")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--utterances", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address", default="local", help="local: a Ray on this machine; HEAD:6379 on a cluster")
    p.add_argument("--replica-cpus", type=float, default=1.0,
                   help="Ray CPUs per replica (1: two replicas fit a 2-core local Ray); omit with --replica-cpus -1 "
                        "to use the runtime preset's")
    p.add_argument("--serve-args", default="", help="more `emoq serve` flags for the front door")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--peak-seconds", type=float, default=1.0)
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.replica_cpus is not None and args.replica_cpus < 0:
        args.replica_cpus = None
    result = run(args)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
