#!/usr/bin/env bash
# GPU acceptance: run on a CUDA machine from the repository root.
#   benchmarks/gpu_acceptance.sh [--dry-run] full|bare OUT_DIR
# full: a GPU box with package access: builds .venv-gpu (make setup-gpu), runs the gpu-marked tests,
#       trains and exports the base preset on CUDA, benchmarks c1/c16/c64 against the eager baseline,
#       times the Triton kernel against the torch reference.
# bare: a GPU box with no package access, only its own python3 (torch, triton, transformers, peft,
#       onnx, onnxruntime, ...): runs from the source tree with PYTHONPATH, no install; steps whose
#       modules are missing are skipped with the reason.
# Every step's command, log and exit status go under OUT_DIR (steps.tsv, logs/NAME.log);
# --dry-run prints the plan (each step's command) and runs nothing.
# Nothing here has run on a GPU yet (see README, "GPU status").
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
MODE="${1:-}"
OUT="${2:-}"
if [[ "$MODE" != "full" && "$MODE" != "bare" ]] || [[ -z "$OUT" ]]; then
  echo "usage: $0 [--dry-run] full|bare OUT_DIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="$(realpath -m "$OUT")"
# DEVICE=cpu rehearses the training and eager steps on a machine without a GPU (the commands stay the same).
DEVICE="${DEVICE:-cuda}"

# Steps: NAME<TAB>TIMEOUT_S<TAB>PYTHON MODULES IT NEEDS (comma list, "-" = none checked)<TAB>COMMAND
STEPS=()
step() { STEPS+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4"); }

if [[ "$MODE" == "full" ]]; then
  PY="$ROOT/.venv-gpu/bin/python"
  EMOQ="$ROOT/.venv-gpu/bin/emoq"
  step setup 420 - "make setup-gpu"
  step env 30 torch "$PY -c 'import torch, vllm, onnxruntime as ort; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), vllm.__version__, ort.__version__, ort.get_available_providers())'"
  step gpu-tests 300 pytest "$PY -m pytest -q -m gpu -p no:cacheprovider --junitxml $OUT/gpu-tests.xml"
  step train-stage1 120 torch "$EMOQ train stage1 --preset base --data synthetic:40 --epochs 1 --device $DEVICE --bf16 --out $OUT/runs/stage1"
  step train-stage2 180 torch "$EMOQ train stage2 --preset base --data synthetic:40 --epochs 1 --device $DEVICE --bf16 --gradient-checkpointing --from-stage1 $OUT/runs/stage1 --out $OUT/runs/stage2"
  step export 180 torch "$EMOQ export --checkpoint $OUT/runs/stage2/best --out $OUT/bundle --fp16 --device cuda"
  step bench 300 torch "$EMOQ bench --bundle $OUT/bundle --engine both --concurrency 1,16,64 --duration 15 --serve-args=--runtime=cuda --out $OUT/bench"
  for dtype in float32 float16 bfloat16; do
    step "kernel-$dtype" 120 torch,triton "$PY -m benchmarks.bench_pooling --dtype $dtype --out $OUT/kernel/$dtype"
  done
else
  PY="${PYTHON:-python3}"
  RUN="env PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
  step env 30 torch "$RUN $PY -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
  for dtype in float32 float16 bfloat16; do
    step "kernel-$dtype" 60 torch,triton "$RUN $PY -m benchmarks.bench_pooling --dtype $dtype --budget-s 0.2 --out $OUT/kernel/$dtype"
  done
  step train-stage1 90 torch,transformers,peft,safetensors,sklearn,tokenizers "$RUN $PY -m training stage1 --preset tiny --data synthetic:8 --epochs 1 --batch-size 8 --device $DEVICE --bf16 --out $OUT/runs/stage1"
  step train-stage2 90 torch,transformers,peft,safetensors,sklearn,tokenizers "$RUN $PY -m training stage2 --preset tiny --data synthetic:8 --epochs 1 --batch-size 8 --device $DEVICE --bf16 --gradient-checkpointing --from-stage1 $OUT/runs/stage1 --out $OUT/runs/stage2"
  step eager-cuda-vs-cpu 60 torch,transformers,peft "$RUN $PY -m benchmarks.gpu_eager_parity $OUT/runs/stage2/best $OUT/eager_cuda_vs_cpu.json"
  step vllm-cuda 0 - "skip: vLLM on CUDA with prompt embeddings needs vllm (full mode: gpu-tests)"
  step ort-cuda 0 - "skip: ORT CUDA provider, IO binding and the fp16 graphs need onnxruntime-gpu (full mode: gpu-tests)"
  step export-bench 0 - "skip: export and serving benchmarks need onnxscript, vllm and the MiniLM package (full mode)"
fi

if (( DRY )); then
  echo "# gpu_acceptance.sh $MODE: plan (dry run, nothing executed); output folder $OUT"
  i=0
  for s in "${STEPS[@]}"; do
    IFS=$'\t' read -r name limit needs cmd <<<"$s"
    i=$((i + 1))
    printf '%2d. %-18s [timeout %ss; needs %s]\n    %s\n' "$i" "$name" "$limit" "$needs" "$cmd"
  done
  exit 0
fi

# The first of these modules the python running the steps cannot import, if any.
have() {
  local m
  [[ "$1" == "-" ]] && return 0
  for m in ${1//,/ }; do
    "$PY" -c "import $m" 2>/dev/null || { echo "$m"; return 1; }
  done
}

mkdir -p "$OUT/logs"
printf 'step\tstatus\tseconds\tcommand\n' >"$OUT/steps.tsv"
failed=0
for s in "${STEPS[@]}"; do
  IFS=$'\t' read -r name limit needs cmd <<<"$s"
  # setup builds the python the later steps check, so it is never skipped.
  if [[ "$cmd" == skip:* ]]; then
    status="skipped:${cmd#skip:}"
    secs=0
  elif [[ "$name" != setup ]] && ! missing=$(have "$needs"); then
    status="skipped: python module $missing missing"
    secs=0
  else
    start=$SECONDS
    timeout "$limit" bash -c "$cmd" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    secs=$((SECONDS - start))
    case $rc in
      0) status=ok ;;
      124) status="failed: timed out after ${limit}s"; failed=1 ;;
      *) status="failed: exit $rc"; failed=1 ;;
    esac
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$cmd" >>"$OUT/steps.tsv"
  echo "$name: $status (${secs}s)"
done
echo "report: $OUT/steps.tsv, logs in $OUT/logs"
exit $failed
