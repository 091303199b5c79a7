"""The researcher's baseline engine: the PyTorch model, one request at a time per worker.

No ONNX, no batching, no vLLM: HuBERT from the bundle's eager/audio_encoder folder, the
EmoQ-Former from eager/former.safetensors and the merged LLM in transformers, each utterance
run alone. It is what "just serve the training code" would cost, so benchmarks compare the
optimised engine against it (`emoq serve --engine eager`), and in fp32 it must give the same
posteriors as the optimised engine.

Two knobs make it the honest baseline on a CPU with native bf16: `cfg.dtype` (fp32 by default;
bf16 runs the encoder and former under bf16 autocast and the LLM in bf16) and `cfg.eager_workers`
single-thread workers sharing one copy of the weights, one per core by default: a plain loop per
core, which beats one loop with many intra-op threads on small per-utterance ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load_file

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.former import EmoQFormer
from emoq_serve.executors.common import StageClock, engine_device, engine_info, predictions
from emoq_serve.executors.heads import PromptEmbedder, load_heads, prompt_builder
from emoq_serve.executors.inputs import model_batch, text_only, text_tokenizer
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.threads import stage_worker
from emoq_serve.executors.llm_backends import TransformersBackend
from emoq_serve.executors.types import Prediction, Utterance


def eager_workers(cfg: RuntimeConfig) -> int:
    """`cfg.eager_workers`, or one per core when it is 0."""
    if cfg.eager_workers < 0:
        raise ValueError(f"eager_workers must be >= 0 (0: one per core), got {cfg.eager_workers}")
    return cfg.eager_workers or os.cpu_count() or 1


class EagerPipeline:
    """PyTorch HuBERT + EmoQ-Former + transformers LLM, one request at a time per worker."""

    def __init__(self, bundle: Bundle, cfg: RuntimeConfig) -> None:
        self.device = engine_device(bundle, cfg, "eager")
        self.bundle, self.cfg = bundle, cfg
        self.dtype = cfg.resolved_dtype()
        self.workers = eager_workers(cfg)
        self.labels = bundle.labels
        model_cfg = bundle.model_config
        audio_cfg = dataclasses.replace(model_cfg.audio, path=str(bundle.file(names.EAGER_AUDIO_ENCODER_DIR)))
        self.audio_encoder = AudioEncoder(audio_cfg).to(self.device).eval()
        weights = load_file(str(bundle.file(names.EAGER_FORMER)))
        self.former = EmoQFormer(model_cfg.former, self.audio_encoder.hidden_size,
                                 weights["embeddings.word.weight"].shape[0])
        self.former.load_state_dict(weights)
        self.former.to(self.device).eval()
        _, head = load_heads(bundle)  # the projector, or an "aux" bundle's auxiliary head
        self.head = head.to(self.device)
        self.tokenizer = text_tokenizer(bundle)
        self.llm: TransformersBackend | None = None
        if bundle.head == "llm":
            self.llm = TransformersBackend(bundle.file(names.LLM_DIR), self.dtype, self.device.type)
            # The LLM's own input embeddings, not embed_tokens.safetensors: the baseline uses only
            # the training-side artefacts.
            self.prompts = PromptEmbedder(prompt_builder(bundle), self.llm.model.get_input_embeddings().weight)
        # The researcher's loop, once per worker, off the event loop; each worker a single
        # intra-op thread (torch's thread count is per OS thread, so set it in each).
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed").
        self._tokenizing = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="emoq-eager",
                                          initializer=stage_worker, initargs=(1,))

    def info(self) -> dict[str, str]:
        llm_backend = "transformers" if self.llm is not None else "none (auxiliary head)"
        info = engine_info(self.bundle, "eager", llm_backend, self.device.type, self.dtype, ("torch", "transformers"))
        return {**info, "eager_workers": str(self.workers)}

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def recognize_one(self, utterance: Utterance) -> Prediction:
        """One utterance through the whole model; timings are its own."""
        clock = StageClock()
        with self._tokenizing:
            batch = model_batch(self.bundle, self.tokenizer, [utterance])
        with self._autocast():
            frames, frame_mask = self.audio_encoder(batch["waveforms"].to(self.device),
                                                    batch["lengths"].to(self.device))
            clock.lap("audio_encoder")
            states = self.former(frames, text_only(self.bundle, frame_mask), batch["input_ids"].to(self.device),
                                 batch["text_mask"].to(self.device))
            clock.lap("former")
            z = self.former.pool(states)
            if self.llm is None:
                posteriors = torch.softmax(self.head(z).float(), dim=-1).cpu().numpy()
                clock.lap("pooling")
                return predictions(self.labels, posteriors, clock.timings)[0]
            clock.lap("pooling")
            soft = self.head(z)
            with self._tokenizing:
                embeds = self.prompts(soft, batch["transcripts"], batch["speakers"])
        posteriors = self.llm.posteriors_sync(embeds, self.prompts.emotion_token_ids)
        clock.lap("llm")
        return predictions(self.labels, posteriors, clock.timings)[0]

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._worker, self.recognize_one, u) for u in batch)))

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.shutdown)
        if self.llm is not None:
            await self.llm.close()
