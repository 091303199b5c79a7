"""Load generators: closed loop at a fixed concurrency, open loop with Poisson arrivals.

Both drive an async `call(request) -> CallResult` and know nothing about gRPC, so the loop logic
is the same for unary and streaming calls and testable without a server. Warm-up requests run
first through the same loop and are thrown away (they pay for lazy initialisation, first-batch
compilation and cold caches). Each measured phase starts from the first workload item, so every
engine sees the same request sequence.

Closed loop (perf_analyzer's default): `concurrency` workers each send their next request as
soon as the previous one answers; it measures capacity at a given number of outstanding calls.
Open loop: requests start at Poisson arrival times whether or not earlier ones answered, which is
what real traffic does; if the generator itself falls behind schedule, `max_send_lag_ms` says so.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.workload import BenchRequest


@dataclass
class CallResult:
    """One finished call. `sent` is when latency starts (for streams: the last chunk sent)."""

    index: int
    sent: float
    done: float
    code: str
    audio_seconds: float
    server_ms: dict[str, float] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        return self.done - self.sent

    @property
    def ok(self) -> bool:
        return self.code == "OK"


Call = Callable[[BenchRequest], Awaitable[CallResult]]
OnResult = Callable[[CallResult], None]


@dataclass(frozen=True)
class Budget:
    """How much to measure: a request count or a duration, after `warmup` discarded requests."""

    requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of requests or duration_s")
        if (self.requests is not None and self.requests < 1) or (self.duration_s is not None and self.duration_s <= 0):
            raise ValueError("requests and duration_s must be positive")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")


@dataclass
class Run:
    """The measured calls of one load point.

    `t0` is when measuring began and `issue_end` when the last request was issued; between the
    two the load was at its nominal level (afterwards the in-flight calls drain with less and
    less concurrency), so steady-state throughput counts the calls that finished in that span.
    """

    results: list[CallResult]
    t0: float
    issue_end: float
    max_send_lag_ms: float = 0.0

    @property
    def wall_s(self) -> float:
        """From the start of measuring until the last call finished."""
        return max(max((r.done for r in self.results), default=self.t0) - self.t0, 1e-9)


def _cycle(workload: Sequence[BenchRequest]) -> Iterator[BenchRequest]:
    if not workload:
        raise ValueError("empty workload")
    return itertools.cycle(workload)


async def _closed_phase(call: Call, items: Iterator[BenchRequest], concurrency: int, count: int | None,
                        deadline: float | None, on_result: OnResult | None) -> tuple[list[CallResult], float]:
    results: list[CallResult] = []
    issued, last_issue = 0, time.monotonic()

    async def worker() -> None:
        nonlocal issued, last_issue
        while (count is None or issued < count) and (deadline is None or time.monotonic() < deadline):
            issued += 1
            last_issue = time.monotonic()
            result = await call(next(items))
            results.append(result)
            if on_result:
                on_result(result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, last_issue


async def _open_phase(call: Call, items: Iterator[BenchRequest], rate: float, rng: np.random.Generator,
                      count: int | None, deadline: float | None,
                      on_result: OnResult | None) -> tuple[list[CallResult], float, float]:
    tasks: list[asyncio.Task[CallResult]] = []
    max_lag = 0.0
    scheduled = last_issue = time.monotonic()
    while (count is None or len(tasks) < count) and (deadline is None or scheduled < deadline):
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        last_issue = time.monotonic()
        max_lag = max(max_lag, last_issue - scheduled)
        task = asyncio.create_task(call(next(items)))
        if on_result:
            task.add_done_callback(lambda t: on_result(t.result()) if not t.exception() else None)
        tasks.append(task)
        scheduled += rng.exponential(1.0 / rate)
    return list(await asyncio.gather(*tasks)), last_issue, max_lag * 1e3


async def run_closed(call: Call, workload: Sequence[BenchRequest], concurrency: int, budget: Budget,
                     on_result: OnResult | None = None, on_measure: Callable[[], None] | None = None) -> Run:
    """Closed loop: `concurrency` outstanding calls at all times until the budget is spent.

    `on_measure` runs between warm-up and measuring (e.g. to scrape the server's counters).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if budget.warmup:
        await _closed_phase(call, _cycle(workload), concurrency, budget.warmup, None, None)
    if on_measure:
        on_measure()
    t0 = time.monotonic()
    deadline = t0 + budget.duration_s if budget.duration_s is not None else None
    results, issue_end = await _closed_phase(call, _cycle(workload), concurrency, budget.requests, deadline, on_result)
    return Run(results=results, t0=t0, issue_end=issue_end)


async def run_open(call: Call, workload: Sequence[BenchRequest], rate: float, budget: Budget, seed: int,
                   on_result: OnResult | None = None, on_measure: Callable[[], None] | None = None) -> Run:
    """Open loop: Poisson arrivals at `rate` requests/s (seeded) until the budget is spent."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = np.random.default_rng(seed)
    if budget.warmup:
        await _open_phase(call, _cycle(workload), rate, rng, budget.warmup, None, None)
    if on_measure:
        on_measure()
    t0 = time.monotonic()
    deadline = t0 + budget.duration_s if budget.duration_s is not None else None
    results, issue_end, lag = await _open_phase(call, _cycle(workload), rate, rng, budget.requests, deadline, on_result)
    return Run(results=results, t0=t0, issue_end=issue_end, max_send_lag_ms=lag)
