"""LLM backends: prompt embeddings in, posteriors over the emotion words out.

The runtime never asks the LLM for text. Each utterance's prompt is given as embeddings
[T_i, H] (template token embeddings with the soft prompt injected), and only the next-token
scores of the C emotion-word tokens are read. Posteriors are the softmax over those C scores,
which equals renormalising the C log-probabilities (the shared log-partition cancels).

- `VllmBackend`: vLLM with `enable_prompt_embeds=True`, `SamplingParams(max_tokens=1,
  logprob_token_ids=ids)`. vLLM's `AsyncLLM` always starts its engine core in a separate
  process; `_EngineThread` instead drives the in-process `LLMEngine` from one background
  thread, so requests from any number of concurrent batches join the engine's continuous
  batch while the event loop and the ONNX stages keep running.
- `TransformersBackend`: plain transformers forward, one padded batch per call (the eager
  fallback and the parity reference).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from emoq_serve.runtime.config import RuntimeConfig

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LLMBackend(Protocol):
    async def posteriors(self, prompt_embeds: list[torch.Tensor], emotion_token_ids: Sequence[int]) -> np.ndarray:
        """Posteriors [B, C] (float64 rows summing to 1) for B prompts of shape [T_i, H]."""
        ...

    async def close(self) -> None: ...


def renormalise(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of logits or log-probabilities, in float64."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _check_ids(emotion_token_ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in emotion_token_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"emotion_token_ids must be non-empty and distinct, got {ids}")
    return ids


class TransformersBackend:
    """transformers causal LM on right-padded prompt embeddings.

    Right padding with an attention mask is exact for a causal model: a real position never
    attends to the padding after it, so the last real position sees exactly its own prompt.
    Forwards run one at a time on a private worker thread: concurrent forwards would only
    split the same intra-op threads between them.
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.dtype = _TORCH_DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype, use_safetensors=True).to(self.device).eval()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emoq-llm")

    @torch.inference_mode()
    def posteriors_sync(self, prompt_embeds: list[torch.Tensor], emotion_token_ids: Sequence[int]) -> np.ndarray:
        ids = _check_ids(emotion_token_ids)
        lengths = torch.tensor([e.shape[0] for e in prompt_embeds], device=self.device)
        embeds = torch.nn.utils.rnn.pad_sequence(
            [e.to(self.device, self.dtype) for e in prompt_embeds], batch_first=True
        )
        mask = torch.arange(embeds.shape[1], device=self.device)[None, :] < lengths[:, None]
        hidden = self.model.model(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
        last = hidden[torch.arange(len(prompt_embeds), device=self.device), lengths - 1]
        logits = self.model.lm_head(last)[:, ids]
        return renormalise(logits.float().cpu().numpy())

    async def posteriors(self, prompt_embeds: list[torch.Tensor], emotion_token_ids: Sequence[int]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.posteriors_sync, prompt_embeds, emotion_token_ids)

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.shutdown)


class _EngineThread:
    """Owns a vLLM `LLMEngine` and is the only thread that touches it.

    The engine is also *built* on this thread: vLLM-CPU binds the OpenMP threads of the thread
    that initialises its worker and sizes its attention metadata by them, so building on one
    thread and stepping on another fails (or runs with the wrong thread count).

    Callers enqueue work as closures; the thread runs them between engine steps, steps while
    requests are unfinished, and resolves each request's asyncio future on its own loop.
    """

    def __init__(self, build: Callable[[], Any]) -> None:
        self._engine: Any = None
        self._startup_error: BaseException | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._closed = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, ready), name="vllm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            raise RuntimeError(f"vLLM engine failed to start: {self._startup_error}") from self._startup_error

    def submit(self, prompt: dict[str, Any], params: Any) -> asyncio.Future:
        """Queue one request; the future gets its final `RequestOutput`. Cancelling aborts it."""
        if self._closed:
            raise RuntimeError("vLLM engine is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = f"emoq-{next(self._ids)}"
        self._inbox.put(lambda: self._add(request_id, prompt, params, loop, future))
        future.add_done_callback(lambda f: self._on_done(request_id, f))
        return future

    def _on_done(self, request_id: str, future: asyncio.Future) -> None:
        """A cancelled caller (deadline, disconnect) frees its slot in the running batch."""
        if future.cancelled():
            self._inbox.put(lambda: self._abort(request_id))

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join()

    def _add(self, request_id: str, prompt: dict[str, Any], params: Any, loop: asyncio.AbstractEventLoop,
             future: asyncio.Future) -> None:
        if future.cancelled():
            return
        try:
            # vLLM suffixes an internal id; outputs and aborts use the id given here.
            self._engine.add_request(request_id, prompt, params)
            self._pending[request_id] = (loop, future)
        except Exception as exc:  # an invalid prompt fails its own request, not the engine
            _notify(loop, future, None, exc)

    def _abort(self, request_id: str) -> None:
        if self._pending.pop(request_id, None) is not None:
            self._engine.abort_request([request_id])

    def _run(self, build: Callable[[], Any], ready: threading.Event) -> None:
        try:
            self._engine = build()
        except BaseException as exc:  # reported to the constructor, which re-raises
            self._startup_error = exc
            return
        finally:
            ready.set()
        while True:
            try:
                item = self._inbox.get(block=not self._pending)
                while True:
                    if item is None:
                        self._fail_all(RuntimeError("vLLM engine closed"))
                        self._shutdown()
                        return
                    item()
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if not self._pending:
                continue
            try:
                outputs = self._engine.step()
            except Exception as exc:
                log.exception("vLLM engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                if out.finished and out.request_id in self._pending:
                    loop, future = self._pending.pop(out.request_id)
                    _notify(loop, future, out, None)

    def _shutdown(self) -> None:
        """Release the worker and vLLM's process-global distributed state, so another engine
        can start in this process (tests, or a server reloading a bundle)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self._engine.engine_core.shutdown()
        self._engine = None
        cleanup_dist_env_and_memory()

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, (loop, future) in list(self._pending.items()):
            self._engine.abort_request([request_id])
            _notify(loop, future, None, exc)
        self._pending.clear()


def _notify(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    """Hand a result to the future's loop; a loop that has since closed has nobody waiting."""
    try:
        loop.call_soon_threadsafe(_settle, future, result, exc)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class VllmBackend:
    """vLLM in-process engine fed prompt embeddings, reading only the emotion-token logprobs."""

    def __init__(self, model_dir: str | Path, cfg: RuntimeConfig) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        # vLLM-CPU moves a "uni" executor into a worker process unless this is "0"; an explicit
        # setting (e.g. "1" for the OMP-pinned worker process) is respected.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        device = cfg.resolved_device()
        args = EngineArgs(
            model=str(model_dir),
            dtype=cfg.resolved_dtype(),
            enable_prompt_embeds=True,
            skip_tokenizer_init=True,  # prompts arrive as embeddings; nothing is detokenized
            max_model_len=cfg.max_prompt_tokens,
            max_num_seqs=max(cfg.max_batch * 2, 8),  # room for two batches in flight
            enforce_eager=device == "cpu",  # torch.compile on CPU costs minutes at startup
            # The fixed template prefix is computed once and its KV blocks reused (the prompt
            # embeddings of each block are hashed, so equal embeddings mean equal keys).
            enable_prefix_caching=True,
            block_size=cfg.vllm_block_size,
            kv_cache_memory_bytes=cfg.vllm_kv_cache_mib << 20 if device == "cpu" else None,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            distributed_executor_backend="uni",  # the worker runs in this process, too
            disable_log_stats=True,
            seed=0,
        )

        def build() -> LLMEngine:
            vllm_config = args.create_engine_config()
            return LLMEngine(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config),
                             log_stats=False, multiprocess_mode=False)

        self._engine = _EngineThread(build)
        self.dtype = _TORCH_DTYPES[cfg.resolved_dtype()]

    async def posteriors(self, prompt_embeds: list[torch.Tensor], emotion_token_ids: Sequence[int]) -> np.ndarray:
        from vllm import SamplingParams

        ids = _check_ids(emotion_token_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
        futures = [self._engine.submit({"prompt_embeds": e.detach().to("cpu", self.dtype)}, params)
                   for e in prompt_embeds]
        try:
            outputs = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        logprobs = [[out.outputs[0].logprobs[0][i].logprob for i in ids] for out in outputs]
        return renormalise(np.array(logprobs))

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.close)


def make_llm_backend(model_dir: str | Path, cfg: RuntimeConfig) -> LLMBackend:
    """The backend `cfg.llm_backend` names, loaded from a HF causal-LM folder."""
    if cfg.llm_backend == "vllm":
        return VllmBackend(model_dir, cfg)
    if cfg.llm_backend == "transformers":
        return TransformersBackend(model_dir, cfg.resolved_dtype(), cfg.resolved_device())
    raise ValueError(f"unknown llm_backend {cfg.llm_backend!r}; expected 'vllm' or 'transformers'")
