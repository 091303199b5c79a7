"""Measure each CPU plan of `emoq_serve/executors/cpu_plans.json` on this machine and record the
winner for its CPU class: the one command that re-measures the table the `cpu` preset reads.

For every bundle given, every repeat serves the bundle once per plan (plans taking turns, so
drift lands on each alike; `EMOQ_CPU_PLAN` makes the server use that plan whatever the class) and
runs the onnx engine's load points. The plan with the best geometric mean, over the bundles, of
its median throughput at the highest concurrency wins; c1 p50 is reported beside it.

    python -m benchmarks.tune_cpu --bundle runs/base_bundle --bundle ~/.cache/emoq/demo/<key>/bundle \\
        --repeats 3 --write          # -> benchmarks/results/cpu_engine/<cpu_class>/tune/

Measure on an otherwise idle machine: the plans differ in how they share the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.config import BenchConfig
from benchmarks.loadgen import Budget
from benchmarks.workload import WorkloadConfig
from emoq_serve.executors.config import CPU_PLAN_ENV, CPU_PLANS_FILE
from emoq_serve.hostinfo import cpu_class

RESULTS = Path("benchmarks/results/cpu_engine")


def plans() -> dict[str, dict[str, Any]]:
    return json.loads(CPU_PLANS_FILE.read_text())["plans"]


def measure(bundle: Path, names: list[str], args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Every repeat x plan on `bundle` as `emoq bench --engine onnx` points, engine named `onnx:<plan>`."""
    from benchmarks.runner import run_bench

    points = []
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for plan in order:
            inflight = plans()[plan].get("inflight_batches", 2)
            os.environ[CPU_PLAN_ENV] = plan
            try:
                report = run_bench(BenchConfig(
                    bundle=bundle, engines=("onnx",), concurrency=args.concurrency,
                    budget=Budget(requests=args.requests, warmup=args.warmup),
                    workload=WorkloadConfig(num_utterances=args.utterances), peak_seconds=0.3,
                    out=out / bundle_name(bundle) / plan / f"r{repeat}",
                    # Until `emoq serve` reads RuntimeConfig.inflight_batches, the plan's slots as a flag.
                    serve_args=f"--no-verify --asr off --max-inflight-batches {inflight}",
                    command=f"python -m benchmarks.tune_cpu (plan {plan}, repeat {repeat})"))
            finally:
                os.environ.pop(CPU_PLAN_ENV, None)
            points += [{**p, "engine": f"onnx:{plan}", "bundle": bundle_name(bundle), "repeat": repeat}
                       for p in report["points"]]
    return points


def bundle_name(bundle: Path) -> str:
    """A bundle's folder name, or its parent's for the demo cache's `<key>/bundle`."""
    return bundle.parent.name if bundle.name == "bundle" else bundle.name


def choose(summary: list[dict[str, Any]], names: list[str], top: int) -> tuple[str, dict[str, float]]:
    """The plan with the best geometric mean over bundles of median throughput at `top`."""
    score = {}
    for plan in names:
        rates = [p["throughput_utt_s"] for p in summary if p["engine"] == f"onnx:{plan}" and p["concurrency"] == top]
        score[plan] = math.exp(sum(math.log(r) for r in rates) / len(rates)) if rates and min(rates) > 0 else 0.0
    return max(score, key=score.get), score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle to measure (repeatable)")
    p.add_argument("--plans", default=",".join(plans()), help="comma list of plans to try (default: all)")
    p.add_argument("--concurrency", type=lambda t: tuple(int(x) for x in t.split(",")), default=(1, 16))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--utterances", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/cpu_engine/<cpu_class>/tune")
    p.add_argument("--write", action="store_true", help="record the winner for this CPU class in cpu_plans.json")
    args = p.parse_args(argv)
    names = [n for n in args.plans.split(",") if n]
    unknown = set(names) - set(plans())
    if unknown:
        p.error(f"unknown plan(s) {sorted(unknown)}; {CPU_PLANS_FILE.name} has {', '.join(plans())}")
    klass = cpu_class()
    out = args.out or RESULTS / klass / "tune"
    points = []
    for bundle in args.bundle:  # one bundle at a time: each summary groups by engine and load only
        points += measure(bundle, names, args, out)
    summary = [s for b in dict.fromkeys(p["bundle"] for p in points)
               for s in stats.median_points([p for p in points if p["bundle"] == b])]
    best, score = choose(summary, names, max(args.concurrency))
    record = {"cpu_class": klass, "plans": names, "score_utt_s": score, "chosen": best,
              "summary": [{k: p[k] for k in ("bundle", "engine", "concurrency", "throughput_utt_s", "latency_ms",
                                             "spread", "mean_batch_size")} | {"server_cpu": p["extra"].get("server_cpu"),
                                                                               "batches": p["extra"].get("batches")}
                          for p in summary],
              "points": points}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(record, indent=2) + "\n")
    for p in summary:
        print(f"{p['bundle']:>28} {p['engine']:>24} c{p['concurrency']:<3} {p['throughput_utt_s']:.2f} utt/s "
              f"[{p['spread']['throughput_utt_s'][0]:.2f}-{p['spread']['throughput_utt_s'][1]:.2f}] "
              f"p50 {p['latency_ms'].get('p50', float('nan')):.0f} ms")
    print(f"{klass}: {best} ({', '.join(f'{k} {v:.2f}' for k, v in score.items())} utt/s geometric mean)")
    if args.write:
        table = json.loads(CPU_PLANS_FILE.read_text())
        table["classes"][klass] = {"plan": best, "measured": str(out / "tune.json")}
        CPU_PLANS_FILE.write_text(json.dumps(table, indent=2) + "\n")
        print(f"wrote {CPU_PLANS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
