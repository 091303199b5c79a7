"""`benchmarks/gpu_acceptance.sh --dry-run` prints the plan of both modes and runs nothing (the
script itself needs a GPU machine; its plan is what can be checked here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.sh"


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def steps(stdout: str) -> dict[str, str]:
    """{step name: its command} from the printed plan."""
    lines = [line for line in stdout.splitlines() if not line.startswith("#")]
    return {head.split()[1]: cmd.strip() for head, cmd in zip(lines[::2], lines[1::2])}


def test_full_plan_sets_up_cuda_venv_tests_trains_exports_benchmarks_and_times_the_kernel(tmp_path):
    out = tmp_path / "full"
    run = dry_run("--dry-run", "full", str(out))
    assert run.returncode == 0, run.stderr
    plan = steps(run.stdout)
    assert list(plan)[:2] == ["setup", "env"] and plan["setup"] == "make setup-gpu"
    assert "-m pytest -q -m gpu" in plan["gpu-tests"]
    assert "--preset base" in plan["train-stage1"] and "--device cuda --bf16" in plan["train-stage2"]
    assert "--gradient-checkpointing" in plan["train-stage2"] and "--fp16 --device cuda" in plan["export"]
    assert "--concurrency 1,16,64" in plan["bench"] and "--engine both" in plan["bench"]
    assert {"kernel-float32", "kernel-float16", "kernel-bfloat16"} <= set(plan)
    assert all(".venv-gpu/bin/" in cmd for name, cmd in plan.items() if name != "setup")
    assert all(str(out) in plan[name] for name in ("gpu-tests", "train-stage1", "export", "bench"))
    assert not out.exists()  # a dry run writes nothing


def test_bare_plan_runs_from_the_source_tree_and_states_what_it_skips(tmp_path):
    out = tmp_path / "bare"
    run = dry_run("--dry-run", "bare", str(out))
    assert run.returncode == 0, run.stderr
    plan = steps(run.stdout)
    runnable = {n: c for n, c in plan.items() if not c.startswith("skip:")}
    assert all(f"PYTHONPATH={SCRIPT.parents[1]}" in c for n, c in runnable.items())
    assert not any("pip " in c or "make " in c or ".venv" in c for c in plan.values())  # no install
    assert "-m training stage1 --preset tiny" in plan["train-stage1"] and "--device cuda --bf16" in plan["train-stage2"]
    assert "benchmarks.gpu_eager_parity" in plan["eager-cuda-vs-cpu"]
    assert {"kernel-float32", "kernel-float16", "kernel-bfloat16"} <= set(plan)
    skipped = {n: c for n, c in plan.items() if c.startswith("skip:")}
    assert set(skipped) == {"vllm-cuda", "ort-cuda", "export-bench"}
    assert "needs vllm" in skipped["vllm-cuda"] and "onnxruntime-gpu" in skipped["ort-cuda"]
    assert not out.exists()


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["--dry-run", "turbo", "x"], ["--dry-run", "bare"]])
def test_bad_arguments_print_usage(args):
    run = dry_run(*args)
    assert run.returncode == 2 and "usage:" in run.stderr
