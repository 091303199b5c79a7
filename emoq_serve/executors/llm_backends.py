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
import contextlib
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

from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.threads import stage_worker
from emoq_serve.executors.types import EngineFailure

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LLMBackend(Protocol):
    def prepare(self, prompt_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """The prompts where and how the engine reads them (device, dtype). Called on the
        pipeline's worker thread, so device copies stay off the event loop; `posteriors` accepts
        unprepared prompts too."""
        ...

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

    def prepare(self, prompt_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """On the model's device in its dtype (on CUDA the soft prompt never leaves the GPU)."""
        return [e.to(self.device, self.dtype) for e in prompt_embeds]

    @torch.inference_mode()
    def posteriors_sync(self, prompt_embeds: list[torch.Tensor], emotion_token_ids: Sequence[int]) -> np.ndarray:
        ids = _check_ids(emotion_token_ids)
        lengths = torch.tensor([e.shape[0] for e in prompt_embeds], device=self.device)
        embeds = torch.nn.utils.rnn.pad_sequence(self.prepare(prompt_embeds), batch_first=True)
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

    Any exception while driving the engine (`step`, `abort_request`, ...) leaves vLLM's
    scheduler in an unknown state, so it breaks the engine for good: every in-flight request
    fails at once with `EngineFailure`, the `watch_failure` callback is told (the supervisor
    rebuilds), and the thread stays up only to refuse new work until `close()`. Without this
    the thread died silently and its callers waited for the watchdog.
    """

    def __init__(self, build: Callable[[], Any], torch_threads: int = 1,
                 compute: threading.Semaphore | None = None) -> None:
        self._engine: Any = None
        self._torch_threads = torch_threads
        self._compute = compute or contextlib.nullcontext()
        self._startup_error: BaseException | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        # Guards _closed/_failure/_on_failure: nothing is queued after close's sentinel, and a
        # failure and a late `watch_failure` cannot miss each other.
        self._lock = threading.Lock()
        self._closed = False
        self._failure: str | None = None  # why the engine broke; set once, by the engine thread
        self._on_failure: Callable[[BaseException], None] | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, ready), name="vllm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            raise RuntimeError(f"vLLM engine failed to start: {self._startup_error}") from self._startup_error

    def submit(self, prompt: dict[str, Any], params: Any) -> asyncio.Future:
        """Queue one request; the future gets its final `RequestOutput`. Cancelling aborts it.

        Raises `EngineFailure` at once if the engine is closed or broken."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = f"emoq-{next(self._ids)}"
        with self._lock:
            if self._closed:
                raise EngineFailure("vLLM engine is closed")
            if self._failure is not None:
                raise EngineFailure(self._failure)
            self._inbox.put(lambda: self._add(request_id, prompt, params, loop, future))
        future.add_done_callback(lambda f: self._on_done(request_id, f))
        return future

    def watch_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(EngineFailure)` (on the engine thread) when the engine breaks; at once
        if it already has."""
        with self._lock:
            self._on_failure = callback
            failure = self._failure
        if failure is not None:
            callback(EngineFailure(failure))

    def _on_done(self, request_id: str, future: asyncio.Future) -> None:
        """A cancelled caller (deadline, disconnect) frees its slot in the running batch."""
        if future.cancelled():
            self._inbox.put(lambda: self._abort(request_id))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(None)
        self._thread.join()

    def _add(self, request_id: str, prompt: dict[str, Any], params: Any, loop: asyncio.AbstractEventLoop,
             future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if self._failure is not None:  # queued just before the engine broke
            _notify(loop, future, None, EngineFailure(self._failure))
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
            # vLLM-CPU in-process binds no OpenMP threads itself: this thread's count is what its
            # forward passes use, so it is set here rather than left to whoever set it first.
            stage_worker(self._torch_threads)
            self._engine = build()
        except BaseException as exc:  # reported to the constructor, which re-raises
            self._startup_error = exc
            return
        finally:
            ready.set()
        while True:
            try:
                if self._run_queued():
                    break
                if self._pending:
                    self._step()
            except Exception as exc:
                self._break(exc)
        self._fail_all("vLLM engine closed")
        self._shutdown()

    def _run_queued(self) -> bool:
        """Run the queued closures (waiting for one while nothing is in flight); True on close."""
        try:
            item = self._inbox.get(block=not self._pending)
            while item is not None:
                item()
                item = self._inbox.get_nowait()
            return True
        except queue.Empty:
            return False

    def _step(self) -> None:
        with self._compute:  # a core for this step, shared with the pipeline's graph workers
            outputs = self._engine.step()
        for out in outputs:
            if out.finished and out.request_id in self._pending:
                loop, future = self._pending.pop(out.request_id)
                _notify(loop, future, out, None)

    def _break(self, exc: Exception) -> None:
        """The engine is unusable: fail what is in flight, refuse the rest, tell the watcher."""
        log.error("vLLM engine failed; failing %d in-flight request(s) and refusing new ones", len(self._pending),
                  exc_info=exc)
        with self._lock:
            first = self._failure is None
            if first:
                self._failure = f"the vLLM engine failed ({type(exc).__name__}: {exc}) and must be rebuilt"
            callback = self._on_failure
        self._fail_all(self._failure)
        if first and callback is not None:
            try:
                callback(EngineFailure(self._failure))
            except Exception:  # the engine thread must outlive a broken watcher
                log.exception("the engine failure callback raised")

    def _shutdown(self) -> None:
        """Release the worker and vLLM's process-global distributed state, so another engine
        can start in this process (tests, or a server reloading a bundle). Also after a failure:
        the rebuilt engine needs that global state cleared."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        try:
            self._engine.engine_core.shutdown()
        except Exception:  # a broken engine may fail to shut down; it is dropped either way
            log.exception("vLLM engine shutdown failed")
        finally:
            self._engine = None
            cleanup_dist_env_and_memory()

    def _fail_all(self, reason: str) -> None:
        """Fail every in-flight request with `EngineFailure(reason)`; no engine call (it may be broken)."""
        for loop, future in self._pending.values():
            _notify(loop, future, None, EngineFailure(reason))
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


def engine_args(model_dir: str | Path, cfg: RuntimeConfig) -> dict[str, Any]:
    """vLLM `EngineArgs` for `cfg`: batch size and tensor parallelism from the runtime preset
    (or the `emoq serve` flags that override it)."""
    device = cfg.resolved_device()
    tp = cfg.tensor_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if device == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs; torch sees {torch.cuda.device_count()}")
    return dict(
        model=str(model_dir),
        dtype=cfg.resolved_dtype(),
        enable_prompt_embeds=True,
        skip_tokenizer_init=True,  # prompts arrive as embeddings; nothing is detokenized
        max_model_len=cfg.max_prompt_tokens,
        max_num_seqs=max(cfg.max_batch * max(cfg.inflight_batches, 2), 8),  # room for every batch in flight
        enforce_eager=device == "cpu",  # torch.compile on CPU costs minutes at startup
        # The fixed template prefix is computed once and its KV blocks reused (the prompt
        # embeddings of each block are hashed, so equal embeddings mean equal keys).
        enable_prefix_caching=True,
        block_size=cfg.vllm_block_size,
        kv_cache_memory_bytes=cfg.vllm_kv_cache_mib << 20 if device == "cpu" else None,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        tensor_parallel_size=tp,
        # One device: the worker runs in this process, too. Several: one worker process per
        # device (the engine core stays in this process).
        distributed_executor_backend="uni" if tp == 1 else "mp",
        disable_log_stats=True,
        seed=0,
    )


class VllmBackend:
    """vLLM in-process engine fed prompt embeddings, reading only the emotion-token logprobs.

    vLLM takes prompt embeddings on the host: its renderer moves them to the CPU itself
    (`vllm/renderers/base.py`, `_process_embeds`: "Tensors must be on CPU for serialization"),
    and the model runner copies them to the GPU. So the soft prompt cannot stay on the GPU into
    vLLM; `prepare` makes the one device-to-host copy for the whole batch, in the engine's
    dtype, on the pipeline's worker thread instead of per prompt on the event loop.
    """

    def __init__(self, model_dir: str | Path, cfg: RuntimeConfig, compute: threading.Semaphore | None = None) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        # vLLM-CPU moves a "uni" executor into a worker process unless this is "0"; an explicit
        # setting (e.g. "1" for the OMP-pinned worker process) is respected.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args = EngineArgs(**engine_args(model_dir, cfg))

        def build() -> LLMEngine:
            vllm_config = args.create_engine_config()
            return LLMEngine(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config),
                             log_stats=False, multiprocess_mode=False)

        self._engine = _EngineThread(build, cfg.torch_threads, compute)
        self.dtype = _TORCH_DTYPES[cfg.resolved_dtype()]

    def prepare(self, prompt_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors in the engine's dtype, copied in one transfer (a no-op when they are already)."""
        if all(e.device.type == "cpu" and e.dtype == self.dtype for e in prompt_embeds):
            return prompt_embeds
        lengths = [e.shape[0] for e in prompt_embeds]
        return list(torch.cat([e.detach() for e in prompt_embeds]).to(self.dtype).cpu().split(lengths))

    async def posteriors(self, prompt_embeds: list[torch.Tensor], emotion_token_ids: Sequence[int]) -> np.ndarray:
        from vllm import SamplingParams

        ids = _check_ids(emotion_token_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
        futures = [self._engine.submit({"prompt_embeds": e}, params) for e in self.prepare(prompt_embeds)]
        try:
            outputs = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        logprobs = [[out.outputs[0].logprobs[0][i].logprob for i in ids] for out in outputs]
        return renormalise(np.array(logprobs))

    def watch_failure(self, callback: Callable[[BaseException], None]) -> None:
        """See `Recognizer`: `callback(EngineFailure)` once the engine thread breaks."""
        self._engine.watch_failure(callback)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.close)


def make_llm_backend(model_dir: str | Path, cfg: RuntimeConfig, compute: threading.Semaphore | None = None,
                     ) -> LLMBackend:
    """The backend `cfg.llm_backend` names, loaded from a HF causal-LM folder. `compute`: the
    pipeline's core budget, held by each vLLM engine step."""
    if cfg.llm_backend == "vllm":
        return VllmBackend(model_dir, cfg, compute)
    if cfg.llm_backend == "transformers":
        return TransformersBackend(model_dir, cfg.resolved_dtype(), cfg.resolved_device())
    raise ValueError(f"unknown llm_backend {cfg.llm_backend!r}; expected 'vllm' or 'transformers'")
