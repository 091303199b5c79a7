"""Dynamic batching in front of a `Recognizer` (Triton-style: max batch, max queue delay).

Why: the encoders and the LLM are far cheaper per utterance in a batch, but a lone request
must not wait long for company. Each request waits at most `max_queue_delay_ms` for others;
a batch leaves as soon as it is full. Requests are grouped by audio length (buckets) so a
short clip is not padded to the length of a long one. The queue is bounded: when it is full
`submit` fails at once (the server answers RESOURCE_EXHAUSTED) instead of letting latency
grow without limit. Deadlines are checked right before compute, so an expired request costs
nothing; a cancelled request leaves the queue immediately and frees its slot.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextvars
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.executors.types import Prediction, Recognizer, Utterance

log = logging.getLogger(__name__)


#: While the batcher runs a batch: the latest `time.monotonic()` deadline among its callers, or
#: None when one of them has none. An engine that retries (the cluster engine) reads it so that it
#: retries only while somebody still waits for the answer.
BATCH_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("emoq_batch_deadline", default=None)


class QueueFull(Exception):
    """The bounded queue has no free slot; retry later (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed before its batch was computed (DEADLINE_EXCEEDED)."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work (UNAVAILABLE)."""


#: When set, every computed batch appends one JSON line to this file (monotonic start and end,
#: the clips' lengths in samples): `emoq bench` reads it for mean batch and padding per load point.
BATCH_TRACE_ENV = "EMOQ_BATCH_TRACE"


#: Audio-length bucket edges (s). About 1.5x apart, so a batch pads its clips by at most ~50 %
#: (on average far less): on CPU a batch costs the padded frames' FLOPs and HuBERT's attention
#: grows with the square of them, so octave-wide buckets made batched requests slower than
#: lone ones.
DEFAULT_BUCKET_EDGES_S: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def bucket_edges(*choices: tuple[float, ...] | None) -> dict[str, tuple[float, ...]]:
    """BatcherConfig's `bucket_edges_s` keyword from the first choice given (a flag, then the
    runtime plan's); none given: no keyword, so the default applies."""
    edges = next((c for c in choices if c is not None), None)
    return {} if edges is None else {"bucket_edges_s": tuple(edges)}


@dataclass
class BatcherConfig:
    """Batching policy. Delays in milliseconds, bucket edges in seconds of 16 kHz audio."""

    max_batch: int = 8
    max_queue_delay_ms: float = 5.0
    queue_size: int = 256
    #: Audio-length bucket edges; a batch only holds utterances from one bucket.
    bucket_edges_s: tuple[float, ...] = DEFAULT_BUCKET_EDGES_S
    #: Batches computed at once. 1 keeps the cores for one batch and lets the queue fill
    #: meanwhile (bigger next batch); >1 helps engines that overlap work (vLLM on GPU).
    max_inflight_batches: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1 or self.max_inflight_batches < 1:
            raise ValueError("max_batch, queue_size and max_inflight_batches must be >= 1")
        if self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must be >= 0")
        if list(self.bucket_edges_s) != sorted(self.bucket_edges_s):
            raise ValueError("bucket_edges_s must be ascending")


@dataclass
class BatcherStats:
    """Counters since start; `batch_sizes[n]` = how many batches of size n were computed."""

    submitted: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)


@dataclass(eq=False)
class _Item:
    utterance: Utterance
    future: asyncio.Future[Prediction]
    enqueued: float
    deadline: float | None
    bucket: int


class DynamicBatcher:
    """Queue utterances, compute them in batches with `recognizer`, hand each its prediction.

    `on_batch(size)` is called for every batch sent to the recognizer (metrics hook).
    Use as `async with DynamicBatcher(...) as b: pred = await b.submit(utt, deadline)`.
    """

    def __init__(
        self,
        recognizer: Recognizer,
        cfg: BatcherConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.cfg = cfg
        self.stats = BatcherStats()
        self._on_batch = on_batch
        self._buckets: list[collections.deque[_Item]] = [
            collections.deque() for _ in range(len(cfg.bucket_edges_s) + 1)
        ]
        self._pending = 0
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.max_inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._trace = os.environ.get(BATCH_TRACE_ENV) or None

    @property
    def queue_depth(self) -> int:
        """Utterances waiting for a batch (not those being computed)."""
        return self._pending

    async def __aenter__(self) -> DynamicBatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="emoq-batcher")

    async def submit(self, utterance: Utterance, deadline: float | None = None) -> Prediction:
        """Queue one utterance and wait for its prediction.

        `deadline` is an absolute `time.monotonic()` instant. Raises `QueueFull` at once when
        the queue is full, `DeadlineExpired` if the deadline passes before compute,
        `BatcherClosed` during shutdown; cancelling the caller removes the item from the queue.
        """
        if self._closing or self._loop_task is None:
            raise BatcherClosed("the server is shutting down")
        if self._pending >= self.cfg.queue_size:
            self.stats.rejected += 1
            raise QueueFull(f"request queue is full ({self.cfg.queue_size} waiting); retry later")
        seconds = len(utterance.audio) / SAMPLE_RATE
        item = _Item(
            utterance=utterance,
            future=asyncio.get_running_loop().create_future(),
            enqueued=time.monotonic(),
            deadline=deadline,
            bucket=bisect.bisect_left(self.cfg.bucket_edges_s, seconds),
        )
        self._buckets[item.bucket].append(item)
        self._pending += 1
        self.stats.submitted += 1
        self._wake.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._discard(item)
            raise

    def _discard(self, item: _Item) -> None:
        """Take a cancelled item out of the queue (no-op once its batch has left)."""
        try:
            self._buckets[item.bucket].remove(item)
        except ValueError:
            return
        self._pending -= 1
        self.stats.cancelled += 1
        self._wake.set()

    def _drop_expired(self, now: float) -> None:
        for bucket in self._buckets:
            for item in [i for i in bucket if i.deadline is not None and i.deadline <= now]:
                bucket.remove(item)
                self._pending -= 1
                self.stats.expired += 1
                if not item.future.done():
                    waited = (now - item.enqueued) * 1e3
                    item.future.set_exception(DeadlineExpired(f"deadline passed after {waited:.0f} ms in the queue"))

    def _take_batch(self) -> list[_Item] | None:
        """The batch that should leave now (full, due, or draining), or None to keep waiting."""
        heads = [b for b in self._buckets if b]
        if not heads:
            return None
        bucket = min(heads, key=lambda b: b[0].enqueued)  # oldest request first: no starvation
        full = len(bucket) >= self.cfg.max_batch
        due = time.monotonic() >= bucket[0].enqueued + self.cfg.max_queue_delay_ms / 1e3
        if not (full or due or self._closing):
            return None
        batch = [bucket.popleft() for _ in range(min(len(bucket), self.cfg.max_batch))]
        self._pending -= len(batch)
        return batch

    def _next_wakeup(self) -> float | None:
        """Seconds until the oldest waiting request is due or a deadline expires."""
        times = [b[0].enqueued + self.cfg.max_queue_delay_ms / 1e3 for b in self._buckets if b]
        times += [i.deadline for b in self._buckets for i in b if i.deadline is not None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    async def _next(self) -> list[_Item] | None:
        """Wait for the next batch; None once closing and the queue is empty."""
        while True:
            self._drop_expired(time.monotonic())
            batch = self._take_batch()
            if batch:
                return batch
            if self._closing and self._pending == 0:
                return None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_wakeup())
            except TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            # Take the slot before forming the batch: while the previous batch computes,
            # arrivals accumulate and the next batch is larger.
            await self._slots.acquire()
            batch = await self._next()
            if batch is None:
                self._slots.release()
                return
            task = asyncio.create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _execute(self, batch: list[_Item]) -> None:
        """Compute one batch; every item ends with its prediction or an exception, whatever fails
        (the engine, the metrics hook, or an engine that answers a different number of rows)."""
        try:
            started = time.monotonic()
            self.stats.batch_sizes[len(batch)] += 1
            if self._on_batch is not None:
                self._on_batch(len(batch))
            deadlines = [i.deadline for i in batch]
            BATCH_DEADLINE.set(None if None in deadlines else max(deadlines))  # this task's own context
            predictions = await self.recognizer.recognize([i.utterance for i in batch])
            if len(predictions) != len(batch):
                raise RuntimeError(f"the engine returned {len(predictions)} predictions for a batch of {len(batch)}")
            for item, pred in zip(batch, predictions, strict=True):
                # Added to the engine's own queue time, if it has one (a cluster replica's batcher).
                pred.timings_ms["queue"] = pred.timings_ms.get("queue", 0.0) + (started - item.enqueued) * 1e3
                if not item.future.done():  # a caller cancelled mid-compute: result dropped
                    item.future.set_result(pred)
        except asyncio.CancelledError:  # close() gave up waiting for this batch
            self._fail(batch, BatcherClosed("the server shut down while this request ran"))
            raise
        except Exception as exc:  # every caller in the batch gets the error
            log.exception("batch of %d failed", len(batch))
            self._fail(batch, exc)
        finally:
            self._slots.release()
            if self._trace:
                self._write_trace(batch, started)

    def _write_trace(self, batch: list[_Item], started: float) -> None:
        line = {"start": started, "end": time.monotonic(), "samples": [len(i.utterance.audio) for i in batch]}
        try:
            with open(self._trace, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:  # a diagnostic must never fail a batch
            log.warning("cannot write the batch trace %s", self._trace, exc_info=True)

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking work, compute everything queued, wait up to `timeout` s for it.

        Whatever has not finished by then fails with `BatcherClosed`.
        """
        self._closing = True
        self._wake.set()
        if self._loop_task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._drain()), timeout=timeout)
        except TimeoutError:
            log.warning("batcher drain timed out after %.1f s; failing the rest", timeout)
        self._loop_task.cancel()
        for task in list(self._inflight):
            task.cancel()
        for bucket in self._buckets:
            self._fail(list(bucket), BatcherClosed("the server shut down before this request ran"))
            bucket.clear()
        self._pending = 0

    @staticmethod
    def _fail(batch: list[_Item], exc: BaseException) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    async def _drain(self) -> None:
        assert self._loop_task is not None
        await self._loop_task
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
