"""DynamicBatcher on real asyncio with an in-test recognizer (batching logic only, no model)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from emoq_serve.engine.batcher import BatcherClosed, BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull
from emoq_serve.executors.types import Prediction, Utterance

SR = 16_000


class RecordingRecognizer:
    """Answers each utterance with its own first sample, records batches, can be held shut."""

    labels = ("a", "b")

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[float]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail

    def info(self) -> dict[str, str]:
        return {}

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        self.batches.append([float(u.audio[0]) for u in batch])
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("engine exploded")
        return [Prediction("a", np.array([u.audio[0], len(u.audio)], dtype=np.float32)) for u in batch]

    async def close(self) -> None:
        pass


def utt(tag: float, seconds: float = 0.5) -> Utterance:
    audio = np.zeros(int(seconds * SR), dtype=np.float32)
    audio[0] = tag
    return Utterance(audio=audio)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_full_batches_and_each_caller_gets_its_own_result():
    async def main():
        rec = RecordingRecognizer()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=4, max_queue_delay_ms=1000)) as b:
            started = time.monotonic()
            preds = await asyncio.gather(*(b.submit(utt(i)) for i in range(10)))
            elapsed = time.monotonic() - started
        return rec, b, preds, elapsed

    rec, b, preds, elapsed = run(main())
    assert [p.probabilities[0] for p in preds] == list(range(10))
    assert [len(x) for x in rec.batches] == [4, 4, 2]  # the remainder waits for the delay
    assert elapsed >= 0.9  # ... of 1 s: the last two were not sent early
    assert b.stats.batch_sizes == {4: 2, 2: 1}
    assert all(p.timings_ms["queue"] >= 0 for p in preds)


def test_lone_request_waits_max_queue_delay_then_runs():
    async def main():
        async with DynamicBatcher(RecordingRecognizer(), BatcherConfig(max_batch=8, max_queue_delay_ms=80)) as b:
            return await b.submit(utt(1.0))

    pred = run(main())
    assert 75 <= pred.timings_ms["queue"] < 1000


def test_batches_never_mix_length_buckets():
    async def main():
        rec = RecordingRecognizer()
        cfg = BatcherConfig(max_batch=8, max_queue_delay_ms=50, bucket_edges_s=(1.0,))
        async with DynamicBatcher(rec, cfg) as b:
            short = [b.submit(utt(i, 0.5)) for i in range(3)]
            long = [b.submit(utt(100 + i, 1.5)) for i in range(3)]
            await asyncio.gather(*short, *long)
        return rec

    rec = run(main())
    assert sorted(sorted(x) for x in rec.batches) == [[0, 1, 2], [100, 101, 102]]


def test_full_queue_rejects_at_once_and_accepted_work_completes():
    async def main():
        rec = RecordingRecognizer()
        rec.gate.clear()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=1, max_queue_delay_ms=0, queue_size=2)) as b:
            first = asyncio.create_task(b.submit(utt(0)))
            while not rec.batches:  # the first request is computing (held at the gate)
                await asyncio.sleep(0.001)
            queued = [asyncio.create_task(b.submit(utt(i))) for i in (1, 2)]
            await asyncio.sleep(0.01)
            assert b.queue_depth == 2
            t0 = time.monotonic()
            with pytest.raises(QueueFull, match="queue is full"):
                await b.submit(utt(3))
            rejected_in = time.monotonic() - t0
            rec.gate.set()
            preds = await asyncio.gather(first, *queued)
        return b, preds, rejected_in

    b, preds, rejected_in = run(main())
    assert rejected_in < 0.05
    assert [p.probabilities[0] for p in preds] == [0, 1, 2]
    assert b.stats.rejected == 1


def test_expired_item_is_dropped_before_compute():
    async def main():
        rec = RecordingRecognizer()
        rec.gate.clear()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=1, max_queue_delay_ms=0)) as b:
            blocker = asyncio.create_task(b.submit(utt(0)))
            await asyncio.sleep(0.01)
            late = asyncio.create_task(b.submit(utt(7), deadline=time.monotonic() + 0.05))
            await asyncio.sleep(0.15)
            rec.gate.set()
            await blocker
            with pytest.raises(DeadlineExpired, match="deadline passed"):
                await late
        return rec, b

    rec, b = run(main())
    assert rec.batches == [[0.0]]  # the expired request never reached the engine
    assert b.stats.expired == 1


def test_deadline_expires_while_waiting_for_batch_company():
    async def main():
        rec = RecordingRecognizer()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=8, max_queue_delay_ms=500)) as b:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExpired):
                await b.submit(utt(1), deadline=time.monotonic() + 0.05)
            return rec, time.monotonic() - t0

    rec, waited = run(main())
    assert rec.batches == []
    assert waited < 0.3  # failed at its deadline, not at the batching delay


def test_cancelled_caller_frees_its_slot():
    async def main():
        rec = RecordingRecognizer()
        rec.gate.clear()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=1, max_queue_delay_ms=0, queue_size=1)) as b:
            blocker = asyncio.create_task(b.submit(utt(0)))
            await asyncio.sleep(0.01)
            doomed = asyncio.create_task(b.submit(utt(5)))
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFull):
                await b.submit(utt(6))
            doomed.cancel()
            await asyncio.sleep(0)
            assert b.queue_depth == 0
            replacement = asyncio.create_task(b.submit(utt(6)))
            rec.gate.set()
            await asyncio.gather(blocker, replacement)
        return rec, b

    rec, b = run(main())
    assert rec.batches == [[0.0], [6.0]]
    assert b.stats.cancelled == 1


def test_engine_error_reaches_every_caller_and_batcher_survives():
    async def main():
        rec = RecordingRecognizer(fail=True)
        async with DynamicBatcher(rec, BatcherConfig(max_batch=4, max_queue_delay_ms=5)) as b:
            results = await asyncio.gather(*(b.submit(utt(i)) for i in range(3)), return_exceptions=True)
            rec.fail = False
            ok = await b.submit(utt(9))
        return results, ok

    results, ok = run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    assert ok.probabilities[0] == 9


class MiscountingRecognizer(RecordingRecognizer):
    """Answers `extra` more (or, negative, fewer) predictions than the batch has, once."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        preds = await super().recognize(batch)
        extra, self.extra = self.extra, 0
        return preds[: len(preds) + extra] if extra < 0 else preds + preds[:1] * extra


@pytest.mark.parametrize("extra", [-1, 1])
def test_miscounted_predictions_fail_every_caller_and_batcher_survives(extra):
    """A prediction list longer or shorter than the batch fails the whole batch (no caller is
    left waiting, none gets a neighbour's row); the next batch is answered normally."""

    async def main():
        rec = MiscountingRecognizer(extra)
        async with DynamicBatcher(rec, BatcherConfig(max_batch=3, max_queue_delay_ms=50)) as b:
            calls = asyncio.gather(*(b.submit(utt(i)) for i in range(3)), return_exceptions=True)
            results = await asyncio.wait_for(calls, 2)
            ok = await asyncio.wait_for(b.submit(utt(9)), 2)
        return rec, results, ok

    rec, results, ok = run(main())
    assert rec.batches[0] == [0.0, 1.0, 2.0]
    assert all(isinstance(r, RuntimeError) and "returned" in str(r) and "batch of 3" in str(r) for r in results)
    assert ok.probabilities[0] == 9


def test_raising_batch_hook_fails_the_batch_and_batcher_survives():
    """The metrics hook runs inside the batch's failure handling: when it raises, the batch's
    callers get that error instead of waiting for ever; the next batch runs."""
    hook_calls = []

    def on_batch(size: int) -> None:
        hook_calls.append(size)
        if len(hook_calls) == 1:
            raise ValueError("injected: metrics hook broke")

    async def main():
        rec = RecordingRecognizer()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=2, max_queue_delay_ms=20), on_batch=on_batch) as b:
            calls = asyncio.gather(b.submit(utt(1)), b.submit(utt(2)), return_exceptions=True)
            results = await asyncio.wait_for(calls, 2)
            ok = await asyncio.wait_for(b.submit(utt(9)), 2)
        return results, ok

    results, ok = run(main())
    assert all(isinstance(r, ValueError) and "metrics hook broke" in str(r) for r in results)
    assert ok.probabilities[0] == 9 and hook_calls == [2, 1]


def test_close_drains_queued_work_then_refuses_new():
    async def main():
        rec = RecordingRecognizer()
        b = DynamicBatcher(rec, BatcherConfig(max_batch=2, max_queue_delay_ms=10_000))
        b.start()
        pending = [asyncio.create_task(b.submit(utt(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await b.close(timeout=5)
        preds = await asyncio.gather(*pending)
        with pytest.raises(BatcherClosed):
            await b.submit(utt(4))
        return preds, time.monotonic() - t0

    preds, took = run(main())
    assert [p.probabilities[0] for p in preds] == [0, 1, 2]
    assert took < 1.0  # draining does not wait out the 10 s batching delay


def test_close_timeout_fails_stuck_requests():
    async def main():
        rec = RecordingRecognizer()
        rec.gate.clear()  # the engine hangs forever
        b = DynamicBatcher(rec, BatcherConfig(max_batch=1, max_queue_delay_ms=0))
        b.start()
        stuck = [asyncio.create_task(b.submit(utt(i))) for i in range(2)]
        await asyncio.sleep(0.01)
        await b.close(timeout=0.1)
        return await asyncio.gather(*stuck, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, BatcherClosed) for r in results)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        BatcherConfig(max_batch=0)
    with pytest.raises(ValueError):
        BatcherConfig(bucket_edges_s=(4.0, 1.0))


def test_default_buckets_bound_padding_to_half_a_clip():
    """With the default edges a batch never pads a clip by more than 50 %: 2.5 s and 3.5 s
    clips (one octave bucket before) now go in separate batches."""
    edges = BatcherConfig().bucket_edges_s
    assert all(hi / lo <= 1.5 for lo, hi in zip(edges, edges[1:]))

    async def main():
        rec = RecordingRecognizer()
        async with DynamicBatcher(rec, BatcherConfig(max_batch=8, max_queue_delay_ms=50)) as b:
            await asyncio.gather(*(b.submit(utt(i, s)) for i, s in enumerate((2.5, 3.5, 2.6, 3.4))))
        return rec

    assert sorted(sorted(x) for x in run(main()).batches) == [[0, 2], [1, 3]]


def test_batch_trace_records_each_computed_batch(tmp_path, monkeypatch):
    """With EMOQ_BATCH_TRACE set, every batch appends its start, end and clip lengths (what
    `emoq bench` reads for mean batch and padding); without it nothing is written."""
    import json

    from emoq_serve.engine.batcher import BATCH_TRACE_ENV

    trace = tmp_path / "batches.jsonl"
    monkeypatch.setenv(BATCH_TRACE_ENV, str(trace))

    async def main():
        async with DynamicBatcher(RecordingRecognizer(), BatcherConfig(max_batch=2, max_queue_delay_ms=1000)) as b:
            await asyncio.gather(*(b.submit(utt(i, seconds=0.5 + 0.1 * i)) for i in range(4)))

    run(main())
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sorted(len(line["samples"]) for line in lines) == [2, 2]
    assert sorted(n for line in lines for n in line["samples"]) == [int((0.5 + 0.1 * i) * SR) for i in range(4)]
    assert all(line["start"] <= line["end"] for line in lines)
    monkeypatch.delenv(BATCH_TRACE_ENV)
    trace.unlink()
    run(main())
    assert not trace.exists()
