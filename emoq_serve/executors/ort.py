"""onnxruntime sessions for the bundle's graphs, fed and read as torch tensors.

Every run goes through IO binding: inputs are bound by pointer from torch tensors and outputs
come back through DLPack, so nothing is copied between torch and onnxruntime, on the CPU as
well as on CUDA (where the tensors stay on the GPU). One code path for both devices means the
binding logic is exercised by the CPU tests.

On CUDA each stage owns a torch stream that ORT computes on (`user_compute_stream`). A run can
come from any thread (the `emoq-graph` workers), whose current stream is not the one the session
was built on, so every run fences both ways: ORT's stream waits for the caller's stream (the
inputs are written), the inputs are marked used on ORT's stream (the caching allocator must not
hand their memory out before ORT has read it), and the caller's stream waits for ORT's (torch's
next kernels read the outputs).

Bundles ship unoptimised graphs: onnxruntime optimises a graph at load for the provider it runs
on (the CPU EP's fused ops would pin a graph to the CPU), and the optimised model is cached under
`$EMOQ_CACHE/ort`, keyed by the graph's content hash, the provider (with what the optimised graph
depends on: CPU instruction set, GPU architecture) and the onnxruntime version, so a server
starts on the already-optimised graph the second time. Never inside the bundle: a bundle's bytes
are what export verified.

Thread settings are deliberate (see `RuntimeConfig`): a fixed intra-op pool, one inter-op
thread and sequential execution, because the graphs are chains and extra pools only fight
the LLM and the other stage for the same few cores.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.dlpack import from_dlpack

log = logging.getLogger(__name__)

#: torch dtype -> numpy dtype that ORT's binding API understands.
_NUMPY_DTYPES: dict[torch.dtype, type] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}
#: Initialisers at least this big go to the cached graph's side `.data` file (ORT otherwise
#: inlines every weight, which breaks for models over 2 GB).
EXTERNAL_DATA_MIN_BYTES = 1024


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


def providers(device: str, stream: int | None = None) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers for `device`; on CUDA, ORT computes on `stream` (a raw cudaStream_t,
    the stage's own torch stream) and `OrtStage.run` fences it against the caller's."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                           "(install onnxruntime-gpu)")
    if stream is None:
        raise ValueError("the CUDA provider needs the stream ORT computes on (OrtStage passes its own)")
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


# -- the per-provider optimised-graph cache -----------------------------------------------------------

def graph_cache_dir() -> Path:
    """Where optimised graphs are cached: `$EMOQ_CACHE/ort` (default ~/.cache/emoq/ort)."""
    from emoq_serve.config import cache_root

    return cache_root() / "ort"


def graph_files(path: Path) -> list[Path]:
    """The graph file and the external-data files its initialisers live in."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations))]


def graph_digest(path: Path, known: Callable[[Path], str | None] = lambda p: None) -> str:
    """sha256 over the graph's files' sha256s (`known` may supply them, e.g. from a manifest):
    new weights behind an unchanged graph file are a new graph too."""
    from emoq_serve.hashing import sha256_file

    lines = [f"{p.name} {known(p) or sha256_file(p)}" for p in graph_files(path)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _cpu_flags_digest() -> str:
    """The optimised CPU graph uses layouts and kernels for this instruction set (NCHWc, AVX-512)."""
    from emoq_serve.hostinfo import cpu_flags

    return hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]


def provider_tag(device: str) -> str:
    """The part of the cache key that says which provider, on what hardware, optimised a graph."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"cuda-sm{major}{minor}"
    return f"cpu-{_cpu_flags_digest()}"


def cache_key(digest: str, device: str) -> str:
    return f"{digest[:24]}-{provider_tag(device)}-ort{ort.__version__}"


def save_optimised_to(opts: ort.SessionOptions, path: Path) -> None:
    """A session built with `opts` writes its optimised graph to `path`, the weights to `<name>.data`."""
    opts.optimized_model_filepath = str(path)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{path.name}.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                  str(EXTERNAL_DATA_MIN_BYTES))


def _cached_session(path: Path, opts: ort.SessionOptions, provs: list, entry: Path
                    ) -> tuple[ort.InferenceSession, bool]:
    """A session on the cached optimised graph in `entry` (True), or on `path`, optimised now and
    saved into `entry` for next time (False). The entry appears by one atomic rename, so a
    concurrent or crashed writer never leaves a half-written graph where a reader looks."""
    cached = entry / path.name
    if cached.exists():
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once already
        try:
            return ort.InferenceSession(str(cached), opts, providers=provs), True
        except Exception:  # a cache entry is disposable: rebuild it rather than refuse to serve
            log.warning("cached optimised graph %s does not load; re-optimising %s", cached, path, exc_info=True)
            shutil.rmtree(entry, ignore_errors=True)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        save_optimised_to(opts, staging / path.name)
        session = ort.InferenceSession(str(path), opts, providers=provs)
        try:
            os.rename(staging, entry)
        except OSError:  # another process cached the same graph first; its copy is as good
            pass
        return session, False
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class OrtStage:
    """One ONNX graph as a function from named torch tensors to named torch tensors.

    `cache_dir`: where the graph optimised for this provider is cached (None: optimise in memory
    at every load); `digest` saves hashing the graph files when the caller knows their hashes.
    """

    def __init__(self, path: str | Path, intra_op_threads: int, device: str = "cpu",
                 cache_dir: str | Path | None = None, digest: str | None = None) -> None:
        self.path = Path(path)
        cuda = device == "cuda"
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else device)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        provs = providers(device, self.stream.cuda_stream if cuda else None)
        opts = session_options(intra_op_threads)
        self.cache_entry: Path | None = None
        self.cache_hit = False
        if cache_dir is None:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=provs)
        else:
            entry = Path(cache_dir) / cache_key(digest or graph_digest(self.path), device)
            try:
                self.session, self.cache_hit = _cached_session(self.path, opts, provs, entry)
                self.cache_entry = entry
            except OSError as exc:  # an unwritable cache costs start-up time, never the service
                log.warning("cannot cache the optimised %s under %s (%s); optimising it in memory",
                            self.path.name, cache_dir, exc)
                self.session = ort.InferenceSession(str(self.path), sess_options=session_options(intra_op_threads),
                                                    providers=provs)
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
        if self.stream is None:
            self.session.run_with_iobinding(binding)
        else:
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # the inputs are written before ORT reads them
            for t in bound.values():
                t.record_stream(self.stream)  # not reused by the allocator before ORT's reads ran
            self.session.run_with_iobinding(binding)
            caller.wait_stream(self.stream)  # torch's next kernels see ORT's outputs
        values = binding.get_outputs()
        return {name: from_dlpack(v._get_c_value().to_dlpack()) for name, v in zip(self.output_names, values)}
