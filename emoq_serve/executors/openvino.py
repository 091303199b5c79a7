"""OpenVINO for the bundle's ONNX graphs on CPUs that compute bf16 natively.

Same interface as `OrtStage` (named torch tensors in, named torch tensors out), so the pipeline
does not know which runtime ran a graph. onnxruntime's CPU kernels have no bf16 path on x86;
OpenVINO's CPU plugin runs the same graph with bf16 matmuls on AVX512-BF16/AMX, which is where
the audio encoder's time goes (benchmarks/results/ has the measurements that chose it).
OpenVINO reads the bundle's graph as shipped (unoptimised; it applies its own fusions).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from emoq_serve.executors.threads import name_os_thread
from emoq_serve.executors.ort import check_inputs

_FIRST_USE = threading.Lock()

#: RuntimeConfig precision -> OpenVINO's inference precision hint.
_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


def _os_thread_name() -> str:
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()
    except OSError:
        return threading.current_thread().name


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OvStage:
    """One ONNX graph compiled by OpenVINO's CPU plugin with a fixed thread budget."""

    def __init__(self, path: str | Path, threads: int, precision: str = "bfloat16", streams: int = 1) -> None:
        import openvino as ov

        if threads < 1 or streams < 1:
            raise ValueError(f"threads and streams must be >= 1, got {threads} and {streams}")
        if precision not in _PRECISION:
            raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(_PRECISION)}")
        self.path, self.precision = Path(path), precision
        core = ov.Core()
        model = core.read_model(str(self.path))
        # A stream per calling thread (`threads` each): the CPU plugin runs one inference at a time
        # per stream, so graph workers sharing one stream would take turns. No pinning: the other
        # stages and the LLM share these cores.
        # The plugin starts its stream threads now, and they inherit this thread's name: name them
        # after the graph, so per-thread CPU samples show which stage they compute.
        previous = _os_thread_name()
        name_os_thread(f"ov-{self.path.stem}")
        try:
            self.compiled = self._compile(core, model, threads, streams, precision)
        finally:
            name_os_thread(previous)
        self.input_names = tuple(p.get_any_name() for p in self.compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self.compiled.outputs)
        self._local = threading.local()  # an infer request per calling thread: requests are not shareable

    @staticmethod
    def _compile(core, model, threads: int, streams: int, precision: str):
        return core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads * streams,
            "NUM_STREAMS": streams,
            "INFERENCE_PRECISION_HINT": _PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        })

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph; outputs are fresh CPU tensors (the request reuses its buffers)."""
        check_inputs(self.path, self.input_names, inputs)
        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in inputs.items()}
        request = getattr(self._local, "request", None)
        if request is None:
            # A thread's first inference, one thread at a time: two graph workers starting their
            # first at once deadlocked in the bindings' one-time initialisation (seen at warm-up).
            with _FIRST_USE:
                request = self._local.request = self.compiled.create_infer_request()
                request.infer(feed)
        else:
            request.infer(feed)
        return {name: torch.from_numpy(request.get_tensor(name).data.copy()) for name in self.output_names}
