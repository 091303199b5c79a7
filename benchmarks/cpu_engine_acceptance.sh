#!/usr/bin/env bash
# Issue 31's acceptance measurement on this machine: the optimised engine (the `cpu` preset, laid on
# the cores by this CPU class's plan in emoq_serve/executors/cpu_plans.json) against eager fp32 and
# eager bf16, at concurrency 1 and 16, medians of 3 repeats (engines taking turns), on the base and
# the demo bundle. Results land in benchmarks/results/cpu_engine/<cpu_class>/{base,demo}_both/.
#
#   benchmarks/cpu_engine_acceptance.sh BASE_BUNDLE DEMO_BUNDLE [--tune]
#
# --tune first re-measures the plans (python -m benchmarks.tune_cpu ... --write) and records the
# winner for this CPU class, so the bench below serves the plan this machine chose.
# Run it on an otherwise idle machine: the engines differ in how they share the cores.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 BASE_BUNDLE DEMO_BUNDLE [--tune]" >&2
  exit 2
fi
base=$1 demo=$2 tune=${3:-}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
class=$($py -c 'from emoq_serve.hostinfo import cpu_class; print(cpu_class())')
out=benchmarks/results/cpu_engine/$class
mkdir -p "$out"
grep -o -m1 'flags.*' /proc/cpuinfo > "$out/cpu_flags.txt"
started=$(date +%s)

if [[ $tune == --tune ]]; then
  $py -m benchmarks.tune_cpu --bundle "$base" --bundle "$demo" --concurrency 1,16 --repeats 3 \
    --requests 32 --warmup 8 --utterances 64 --out "$out/tune" --write
fi

# `emoq serve` takes the plan's in-flight batches by default; the eager baselines get the same
# slots through the flag (more queued work only keeps their two workers busier).
inflight=$($py -c 'from emoq_serve.executors.config import runtime_preset; print(runtime_preset("cpu").inflight_batches)')
# The demo model answers about 25 requests a second: 32 requests would be a second of load per
# repeat, too short to measure, so it gets 160 (the base model's 32 take 7 s for the optimised
# engine at c16, up to about 50 s for eager fp32 at c1).
for name in base demo; do
  bundle=$base requests=32
  [[ $name == demo ]] && bundle=$demo requests=160
  $py -m emoq_serve.cli bench --bundle "$bundle" --engine both --concurrency 1,16 --repeats 3 \
    --requests $requests --warmup 8 --utterances 64 \
    --serve-args="--no-verify --asr off --max-inflight-batches $inflight" --out "$out/${name}_both"
done
echo "acceptance on $class done in $(( $(date +%s) - started )) s: $out/{base,demo}_both/bench.md"
