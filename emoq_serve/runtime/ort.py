"""onnxruntime sessions for the bundle's graphs, fed and read as torch tensors.

Every run goes through IO binding: inputs are bound by pointer from torch tensors and outputs
come back through DLPack, so nothing is copied between torch and onnxruntime, on the CPU as
well as on CUDA (where the tensors stay on the GPU and ORT runs on torch's current stream).
One code path for both devices means the binding logic is exercised by the CPU tests.

Thread settings are deliberate (see `RuntimeConfig`): a fixed intra-op pool, one inter-op
thread and sequential execution, because the graphs are chains and extra pools only fight
the LLM and the other stage for the same few cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.dlpack import from_dlpack

#: torch dtype -> numpy dtype that ORT's binding API understands.
_NUMPY_DTYPES: dict[torch.dtype, type] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options with an explicit thread budget and full graph optimisation."""
    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads that spin waiting for work burn the cores the other stages need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers for `device`; CUDA shares torch's stream so no extra sync is needed."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                           "(install onnxruntime-gpu)")
    stream = torch.cuda.current_stream().cuda_stream
    cuda_opts = {
        "device_id": str(torch.cuda.current_device()),
        "user_compute_stream": str(stream),
        # EXHAUSTIVE (the default) benchmarks every conv algorithm again for each new audio length.
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]


def check_inputs(path: Path, expected: tuple[str, ...], inputs: dict[str, torch.Tensor]) -> None:
    """A graph's inputs by name, exactly: a clear error instead of the runtime's own."""
    missing = set(expected) - inputs.keys()
    unknown = inputs.keys() - set(expected)
    if missing or unknown:
        raise ValueError(f"{path.name}: missing inputs {sorted(missing)}, unknown inputs {sorted(unknown)}")


class OrtStage:
    """One ONNX graph as a function from named torch tensors to named torch tensors."""

    def __init__(self, path: str | Path, intra_op_threads: int, device: str = "cpu") -> None:
        self.path = Path(path)
        self.device = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options(intra_op_threads), providers=providers(device)
        )
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph; outputs live on this stage's device and share ORT's buffers."""
        check_inputs(self.path, self.input_names, inputs)
        kind, index = self.device.type, self.device.index or 0
        binding = self.session.io_binding()
        # Keep the contiguous copies referenced until the run finishes: ORT reads their memory.
        bound = {name: t.to(self.device).contiguous() for name, t in inputs.items()}
        for name, t in bound.items():
            if t.dtype not in _NUMPY_DTYPES:
                raise TypeError(f"{self.path.name}: input {name!r} has unsupported dtype {t.dtype}")
            binding.bind_input(name, kind, index, _NUMPY_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, kind, index)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: from_dlpack(v._get_c_value().to_dlpack()) for name, v in zip(self.output_names, values)}
