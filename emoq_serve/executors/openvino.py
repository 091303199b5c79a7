"""OpenVINO for the bundle's ONNX graphs on CPUs that compute bf16 natively.

Same interface as `OrtStage` (named torch tensors in, named torch tensors out), so the pipeline
does not know which runtime ran a graph. onnxruntime's CPU kernels have no bf16 path on x86;
OpenVINO's CPU plugin runs the same graph with bf16 matmuls on AVX512-BF16/AMX, which is where
the audio encoder's time goes (benchmarks/results/ has the measurements that chose it).
OpenVINO reads the bundle's graph as shipped (unoptimised; it applies its own fusions).

In int8 (`precision="int8"`) it reads instead the bundle's NNCF-quantised copy of the graph
(`int8_graph`: OpenVINO IR beside the ONNX file, written by `export/quantize.py`), whose matmuls
run on VNNI/AMX-INT8; the ops left unquantised run in bf16 where the CPU has it, else f32.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from emoq_serve import bundle as names
from emoq_serve.executors.ort import check_inputs
from emoq_serve.executors.threads import name_os_thread
from emoq_serve.hostinfo import cpu_has_native_bf16

_FIRST_USE = threading.Lock()

#: RuntimeConfig precision -> OpenVINO's inference precision hint (int8: for the unquantised ops).
_PRECISION = {"float32": "f32", "bfloat16": "bf16", "int8": None}

#: The fp32 ONNX graph -> its int8 copy in the bundle (OpenVINO IR: `.xml`, weights in `.bin`).
INT8_GRAPHS = {names.AUDIO_ENCODER_ONNX: "audio_encoder.int8.xml", names.FORMER_ONNX: "former.int8.xml"}


def int8_graph(path: str | Path) -> Path:
    """The int8 copy of the bundle graph at `path` (which the int8 variant of the bundle holds)."""
    path = Path(path)
    if path.name not in INT8_GRAPHS:
        raise ValueError(f"{path.name} has no int8 copy; int8 graphs exist for {', '.join(INT8_GRAPHS)}")
    graph = path.with_name(INT8_GRAPHS[path.name])
    if not graph.is_file():
        raise FileNotFoundError(f"{graph} is missing: this bundle has no int8 variant (`emoq export --add-variant "
                                "int8`)")
    return graph


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
    """One ONNX graph compiled by OpenVINO's CPU plugin with a fixed thread budget.

    `wide_threads` > 0 compiles the graph a second time as one stream of that many threads
    (`run_wide`): for a lone request that finds the other cores idle, which the per-worker streams
    (one thread each) would leave idle.
    """

    def __init__(self, path: str | Path, threads: int, precision: str = "bfloat16", streams: int = 1,
                 wide_threads: int = 0) -> None:
        import openvino as ov

        if threads < 1 or streams < 1:
            raise ValueError(f"threads and streams must be >= 1, got {threads} and {streams}")
        if precision not in _PRECISION:
            raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(_PRECISION)}")
        self.path, self.precision = Path(path), precision
        if precision == "int8":
            self.path = int8_graph(path)
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
            self.wide = self._compile(core, model, wide_threads, 1, precision) if wide_threads > 0 else None
        finally:
            name_os_thread(previous)
        self.input_names = tuple(p.get_any_name() for p in self.compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self.compiled.outputs)
        self._local = threading.local()  # an infer request per calling thread: requests are not shareable
        self._wide_lock = threading.Lock()  # one wide request: it takes every core anyway
        self._wide_request = None

    @staticmethod
    def _compile(core, model, threads: int, streams: int, precision: str):
        return core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads * streams,
            "NUM_STREAMS": streams,
            "INFERENCE_PRECISION_HINT": _PRECISION[precision] or ("bf16" if cpu_has_native_bf16() else "f32"),
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        })

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph; outputs are fresh CPU tensors (the request reuses its buffers)."""
        feed = self._feed(inputs)
        request = getattr(self._local, "request", None)
        if request is None:
            # A thread's first inference, one thread at a time: two graph workers starting their
            # first at once deadlocked in the bindings' one-time initialisation (seen at warm-up).
            with _FIRST_USE:
                request = self._local.request = self.compiled.create_infer_request()
                request.infer(feed)
        else:
            request.infer(feed)
        return self._outputs(request)

    def run_wide(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """`run` on the wide compilation (all `wide_threads` on this one request)."""
        if self.wide is None:
            raise RuntimeError(f"{self.path.name} was compiled without wide_threads")
        feed = self._feed(inputs)
        with self._wide_lock:
            if self._wide_request is None:
                with _FIRST_USE:
                    self._wide_request = self.wide.create_infer_request()
            self._wide_request.infer(feed)
            return self._outputs(self._wide_request)

    def _feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        check_inputs(self.path, self.input_names, inputs)
        return {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in inputs.items()}

    def _outputs(self, request) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(request.get_tensor(name).data.copy()) for name in self.output_names}
