"""Runtime settings: which engine pieces run where, with how many threads, in which precision.

Kept apart from `ModelConfig` on purpose: the bundle fixes *what* is computed, this fixes *how*.
The same bundle serves from a 2-core CPU box and from a GPU with different `RuntimeConfig`s.

Threads are explicit per stage because on a small shared CPU, letting every library pick its
own pool oversubscribes the cores and makes small ops many times slower (ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emoq_serve import hostinfo
from emoq_serve.hostinfo import cpu_flags, cpu_has_native_bf16

LLMBackendName = Literal["vllm", "transformers"]
DeviceName = Literal["cpu", "cuda", "auto"]
DTypeName = Literal["float32", "bfloat16", "auto"]
GraphRuntimeName = Literal["onnxruntime", "openvino", "auto"]
GraphPrecisionName = Literal["float32", "float16", "auto"]
OvPrecisionName = Literal["float32", "bfloat16", "int8", "auto"]

#: The bundle's int8 graphs (NNCF-quantised, OpenVINO IR), recorded in `parity.variants` under this name.
INT8_VARIANT = "openvino_int8"
#: The bf16 variant's name in `parity.variants`.
BF16_VARIANT = "openvino_bf16"

log = logging.getLogger(__name__)


def cpu_has_int8() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI on AVX-512 or AVX, or AMX-INT8):
    where OpenVINO's int8 matmuls beat bf16; elsewhere int8 is emulated and never picked."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


@dataclass
class RuntimeConfig:
    """How a bundle is run. Every field has a CPU-safe default."""

    llm_backend: LLMBackendName = "vllm"
    device: DeviceName = "auto"
    #: LLM weights/activations. float32 reproduces the eager model; bfloat16 is several times
    #: faster on CPUs with native bf16 (AVX512-BF16/AMX) but agrees only loosely, and many times
    #: *slower* on CPUs without it (AVX2 emulates it). `auto` picks by the hardware.
    dtype: DTypeName = "float32"
    max_batch: int = 16
    #: What runs audio_encoder.onnx and former.onnx: onnxruntime (any device, fp32), or OpenVINO
    #: (CPU, in `dtype`: bf16 matmuls where the CPU has them). `auto`: OpenVINO when the graphs
    #: would run on a CPU in bf16 and it is installed, onnxruntime otherwise.
    graph_runtime: GraphRuntimeName = "onnxruntime"
    #: Which audio-encoder graph onnxruntime runs: the fp32 one, or the fp16 one a bundle
    #: exported with `--fp16` holds (for the CUDA EP; export records its parity). `auto`: fp16 on
    #: CUDA when the bundle has it, fp32 otherwise.
    audio_precision: GraphPrecisionName = "auto"
    #: What OpenVINO computes the graphs in (`emoq serve --precision`): float32, bfloat16, or
    #: int8 (the bundle's NNCF-quantised graphs: int8 matmuls, the unquantised ops in bf16 where
    #: the CPU has it). `auto`: the LLM's `dtype`, or int8 when `auto_int8` is set and the bundle
    #: holds the int8 variant recorded on. bfloat16 and int8 run on OpenVINO.
    graph_precision: OvPrecisionName = "auto"
    #: Let `graph_precision: auto` pick the bundle's int8 graphs: set by the cpu preset for the
    #: CPU classes whose entry in cpu_plans.json says int8 was measured faster (and has VNNI).
    auto_int8: bool = False
    #: Cache the graphs onnxruntime optimised for this provider under `$EMOQ_CACHE/ort`, so a
    #: restart skips the optimisation (see `executors/ort.py`); off: optimise in memory at each load.
    graph_cache: bool = True
    #: onnxruntime intra-op threads for audio_encoder.onnx / former.onnx (inter-op is always 1:
    #: the graphs are sequential chains, a second pool only competes for the same cores).
    audio_threads: int = 1
    former_threads: int = 1
    #: Run the audio encoder on each clip alone instead of on the zero-padded batch: on a CPU a
    #: batch buys little and the padding is pure waste; on a GPU batching pays.
    audio_per_utterance: bool = False
    #: Pad each clip (with `audio_per_utterance`) or batch up to the next length on a geometric
    #: grid this ratio apart (1: exact lengths). OpenVINO compiles its kernels again for every new
    #: input shape, which costs more than the small encoder's compute; on a grid the shapes recur,
    #: for at most this ratio of padding (the encoder is padding-invariant: same frames).
    audio_length_ratio: float = 1.0
    #: At load, run the audio encoder on every grid length up to this many seconds (0: none), on
    #: each graph worker: the first request of each length then finds its kernels compiled. Meant
    #: for the grid (`audio_per_utterance` with `audio_length_ratio` > 1, a few dozen shapes).
    warmup_audio_s: float = 0.0
    #: Pad the transcript tokens to a multiple of this (1: the batch's longest), for the same reason.
    text_length_multiple: int = 1
    #: Worker threads running the ONNX stages of different batches at once (each stage with its
    #: own thread budget; OpenVINO compiles a stream per worker), so two batches' audio encoders
    #: can use two cores while the LLM waits.
    graph_workers: int = 1
    #: Batches the server should keep in the engine at once (its batcher's in-flight slots): a
    #: graph worker's batch each, plus one in the LLM. Read by `emoq serve` unless
    #: --max-inflight-batches is given; it also sizes vLLM's max_num_seqs.
    inflight_batches: int = 2
    #: Compute threads allowed at once: each graph worker's stages and each vLLM engine step hold
    #: one of these slots while they run (0: no limit). Set to the cores, graph workers and the
    #: LLM share them without ever time-slicing one core between two compute threads.
    compute_slots: int = 0
    #: A batch of one utterance that finds every compute slot free runs its OpenVINO graphs on all
    #: of them (a second compilation: one stream of `compute_slots` threads) and holds the slots
    #: meanwhile. At low load one request is all the work, and the per-worker single-thread
    #: streams would leave the other cores idle; under load the slots are taken and nothing changes.
    lone_batch_wide: bool = False
    #: Audio-length bucket edges (s) the server's batcher groups requests by; None: the batcher's
    #: default (narrow buckets: a padded audio encoder pays for padding quadratically); () one
    #: bucket. Read by `emoq serve` unless --length-buckets is given.
    bucket_edges_s: tuple[float, ...] | None = None
    #: torch intra-op threads: pooling, projector, prompt assembly and the LLM (either backend;
    #: the in-process vLLM engine inherits the count when it starts, and vLLM-CPU then turns
    #: later `torch.set_num_threads` calls in this process into no-ops).
    torch_threads: int = 1
    #: vLLM KV-cache size on CPU (MiB; on CPU vLLM would otherwise reserve ~90% of RAM) and
    #: the GPU memory share on CUDA. Prompts are short and produce one token, so small is fine.
    vllm_kv_cache_mib: int = 256
    vllm_gpu_memory_utilization: float = 0.5
    #: GPUs vLLM shards the LLM over (tensor parallelism; 1 = one device, in this process).
    tensor_parallel_size: int = 1
    #: KV-cache block size in tokens (vLLM-CPU's attention needs a multiple of 32). vLLM's prefix
    #: cache reuses whole blocks only, and every prompt opens with the same ~40-token chat
    #: template (system prompt, role tags), so 32 lets later requests skip a block of prefill;
    #: vLLM-CPU's default, 128, is longer than a whole prompt and caches nothing.
    vllm_block_size: int = 32
    #: LLM context the engine reserves: the longest prompt (template + transcript + soft
    #: tokens) plus the one scored token; at most the model's max_position_embeddings.
    max_prompt_tokens: int = 512
    #: The eager baseline's single-thread workers (0: one per core), each running whole
    #: utterances on one shared copy of the weights.
    eager_workers: int = 0
    #: Check every bundle file's sha256 at load (slow for big bundles, catches corruption).
    verify_hashes: bool = True

    def __post_init__(self) -> None:
        from emoq_serve.config import check_literals

        check_literals(self, llm_backend=LLMBackendName, device=DeviceName, dtype=DTypeName,
                       graph_runtime=GraphRuntimeName, audio_precision=GraphPrecisionName,
                       graph_precision=OvPrecisionName)

    def resolved_device(self) -> Literal["cpu", "cuda"]:
        """`auto` means CUDA when torch sees a GPU, CPU otherwise."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> Literal["float32", "bfloat16"]:
        """`auto` means bf16 on CUDA and on CPUs with native bf16 instructions, fp32 otherwise."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device() == "cuda" or cpu_has_native_bf16() else "float32"

    def resolved_graph_runtime(self) -> Literal["onnxruntime", "openvino"]:
        reduced = self.graph_precision in ("bfloat16", "int8")  # onnxruntime's CPU kernels have neither
        if self.graph_runtime != "auto":
            if self.graph_runtime == "openvino" and self.resolved_device() != "cpu":
                raise ValueError("graph_runtime 'openvino' runs on the CPU only; use onnxruntime on CUDA")
            if self.graph_runtime == "onnxruntime" and reduced:
                raise ValueError(f"graph_precision {self.graph_precision!r} runs on OpenVINO; onnxruntime runs "
                                 "the graphs in float32")
            return self.graph_runtime
        if reduced:
            if self.resolved_device() != "cpu":
                raise ValueError(f"graph_precision {self.graph_precision!r} runs on OpenVINO, on the CPU only")
            return "openvino"
        if self.resolved_device() == "cpu" and self.resolved_dtype() == "bfloat16":
            from emoq_serve.executors.openvino import openvino_available

            if openvino_available():
                return "openvino"
        return "onnxruntime"

    def resolved_audio_precision(self, bundle_has_fp16: bool) -> Literal["float32", "float16"]:
        """`auto` means the fp16 graph where it was made for (onnxruntime on CUDA) if exported."""
        if self.audio_precision != "auto":
            if self.audio_precision == "float16" and not bundle_has_fp16:
                raise ValueError("audio_precision 'float16' asked, but the bundle has no fp16 audio graph "
                                 "(export it with `emoq export --fp16`)")
            return self.audio_precision
        cuda_ort = self.resolved_device() == "cuda" and self.resolved_graph_runtime() == "onnxruntime"
        return "float16" if cuda_ort and bundle_has_fp16 else "float32"

    def resolved_graph_precision(self) -> Literal["float32", "bfloat16", "int8"]:
        """What OpenVINO computes the graphs in (what `OvStage` takes): as set, or with `auto` the
        LLM's dtype (int8 is chosen per bundle, by `for_bundle`). onnxruntime: always float32."""
        if self.graph_precision != "auto":
            return self.graph_precision
        return self.resolved_dtype() if self.resolved_graph_runtime() == "openvino" else "float32"

    def for_bundle(self, manifest: dict) -> RuntimeConfig:
        """This config for one bundle. A precision variant its export recorded off
        (`parity.variants_off`) or never built is not served: `--precision int8` on such a bundle
        is refused (ValueError saying why); `auto` picks int8 only where `auto_int8` is set and the
        variant is on, and where `auto` would pick the OpenVINO bf16 variant but it is off, the
        exact fp32 path (onnxruntime graphs, fp32 LLM) instead. Explicit settings are kept."""
        parity = manifest.get("parity", {})
        off = parity.get("variants_off", {})
        if self.graph_precision == "int8":
            if why := int8_unavailable(manifest):
                raise ValueError(f"graph_precision 'int8' asked, but {why}")
            return self
        if (self.graph_precision == "auto" and self.auto_int8 and cpu_has_int8() and self.graph_runtime == "auto"
                and self.resolved_device() == "cpu" and not int8_unavailable(manifest)):
            return self.replace(graph_precision="int8")
        if BF16_VARIANT not in off or self.graph_runtime != "auto" or self.dtype != "auto":
            return self
        if self.graph_precision not in ("auto", "bfloat16") or self.resolved_graph_runtime() != "openvino":
            return self
        if self.graph_precision == "bfloat16":
            raise ValueError(f"graph_precision 'bfloat16' asked, but this bundle's OpenVINO bf16 variant is off "
                             f"({off[BF16_VARIANT]})")
        log.warning("this bundle's OpenVINO bf16 variant is off (%s): serving exact fp32 with onnxruntime",
                    off[BF16_VARIANT])
        return self.replace(graph_runtime="onnxruntime", dtype="float32")

    def replace(self, **changes: object) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


def int8_unavailable(manifest: dict) -> str | None:
    """Why a bundle cannot serve its int8 graphs (None: it can): not built, or recorded off."""
    parity = manifest.get("parity", {})
    if INT8_VARIANT in parity.get("variants_off", {}):
        return f"this bundle's int8 variant is off ({parity['variants_off'][INT8_VARIANT]})"
    if INT8_VARIANT not in parity.get("variants", {}):
        return ("this bundle has no int8 variant (build it with `emoq export --add-variant int8 --bundle B --out B2`, "
                "on a CPU with VNNI)")
    return None


#: How the `cpu` preset lays the engine on the cores, per CPU class (`hostinfo.cpu_class()`):
#: measured plans, re-measured and rewritten by `python -m benchmarks.tune_cpu` (see there).
CPU_PLANS_FILE = Path(__file__).with_name("cpu_plans.json")
#: Names a plan of CPU_PLANS_FILE to use whatever this CPU's class is (how tune_cpu tries each).
CPU_PLAN_ENV = "EMOQ_CPU_PLAN"
#: The RuntimeConfig fields a plan may set.
PLAN_FIELDS = ("graph_workers", "compute_slots", "inflight_batches", "audio_per_utterance", "audio_length_ratio",
               "warmup_audio_s", "text_length_multiple", "max_batch", "lone_batch_wide", "bucket_edges_s")


def cpu_plan(cpu_class: str | None = None) -> tuple[str, dict[str, object]]:
    """(plan name, RuntimeConfig fields) for this CPU: $EMOQ_CPU_PLAN, else the table's choice
    for the class, else its default plan; plus `auto_int8` where the class's entry says int8.
    "cores" as a value means os.cpu_count()."""
    try:
        table = json.loads(CPU_PLANS_FILE.read_text())
    except OSError:  # an install without the package data: the plan every class can run
        log.warning("%s is missing: the cpu preset uses the stage-per-thread plan", CPU_PLANS_FILE)
        return "stage-per-thread", {"graph_workers": 1, "compute_slots": 0, "inflight_batches": 2}
    entry = table["classes"].get(cpu_class or hostinfo.cpu_class(), {})
    name = os.environ.get(CPU_PLAN_ENV) or entry.get("plan", table["default"])
    if name not in table["plans"]:
        raise ValueError(f"unknown CPU plan {name!r}; {CPU_PLANS_FILE.name} has {', '.join(table['plans'])}")
    cores = os.cpu_count() or 1
    fields = {k: cores if v == "cores" else tuple(v) if isinstance(v, list) else v
              for k, v in table["plans"][name].items() if k in PLAN_FIELDS}
    # A class entry's "int8": true (set where int8 graphs were measured faster than bf16 on that
    # class) lets the preset's `auto` precision serve a bundle's int8 variant.
    return name, {**fields, **({"auto_int8": True} if entry.get("int8") else {})}


def _cpu_preset() -> RuntimeConfig:
    """The CPU server: OpenVINO bf16 graphs and the LLM in bf16 where the CPU has native bf16, every
    compute thread single-threaded (a 2-thread matmul next to other busy threads collapses), laid
    on the cores by this CPU class's plan. max_batch 8: what `emoq serve` ran with when --max-batch
    always overrode the preset."""
    _, fields = cpu_plan()
    return RuntimeConfig(device="cpu", dtype="auto", graph_runtime="auto", audio_threads=1, former_threads=1,
                         torch_threads=1, **{"max_batch": 8, **fields})


#: Named starting points; the CLI overrides single fields on top of one of these.
RUNTIME_PRESETS: dict[str, RuntimeConfig] = {
    # Parity runs and tests: exact fp32, one thread everywhere (deterministic, no contention).
    "test": RuntimeConfig(device="cpu", max_batch=8, verify_hashes=True),
    "cpu": _cpu_preset(),
    # max_batch 64 also sizes vLLM's max_num_seqs (times the batches in flight).
    "cuda": RuntimeConfig(device="cuda", dtype="bfloat16", max_batch=64),
}


def runtime_preset(name: str) -> RuntimeConfig:
    """A fresh copy of a named runtime preset."""
    if name not in RUNTIME_PRESETS:
        raise ValueError(f"unknown runtime preset {name!r}; choose one of {', '.join(RUNTIME_PRESETS)}")
    return dataclasses.replace(RUNTIME_PRESETS[name])
