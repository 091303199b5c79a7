"""Statistics of one load point: latency percentiles, throughput, errors, server-side breakdown.

The server-side breakdown comes from each response's timing fields (what the server measured per
stage); the mean batch size comes from the server's Prometheus endpoint, scraped before and after
the load point, so it covers exactly the measured calls plus nothing else (warm-up is scraped
away). Both are reported next to the client's end-to-end latency, so the gap between client and
server time (network, serialisation, client overhead) is visible too.
"""

from __future__ import annotations

import collections
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.loadgen import Run

PERCENTILES = (50, 90, 95, 99)

#: The server's batch-size histogram (prometheus_client exposes `<name>_sum` and `<name>_count`).
BATCH_SIZE_METRIC = "emoq_batch_size"


@dataclass
class LoadPoint:
    """Everything measured at one concurrency (closed loop) or rate (open loop) for one engine."""

    engine: str
    mode: str
    api: str
    concurrency: int | None
    rate: float | None
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    throughput_utt_s: float
    throughput_audio_s_s: float
    latency_ms: dict[str, float]
    server_ms: dict[str, float]
    mean_batch_size: float | None
    max_send_lag_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_summary(latencies_s: np.ndarray) -> dict[str, float]:
    """p50/p90/p95/p99, mean, min and max in milliseconds (NaN-free: empty gives {})."""
    if latencies_s.size == 0:
        return {}
    ms = latencies_s * 1e3
    out = {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}
    out.update(mean=float(ms.mean()), min=float(ms.min()), max=float(ms.max()))
    return out


def server_breakdown(run: Run) -> dict[str, float]:
    """Mean server-reported milliseconds per stage over the successful calls."""
    sums: dict[str, float] = collections.defaultdict(float)
    ok = [r for r in run.results if r.ok]
    for r in ok:
        for stage, ms in r.server_ms.items():
            sums[stage] += ms
    return {stage: total / len(ok) for stage, total in sums.items()}


def steady_throughput(run: Run) -> tuple[float, float]:
    """(utterances/s, audio-seconds/s) of the successful calls that finished while the load was
    at its nominal level; over the whole run when that span holds fewer than two calls."""
    ok = [r for r in run.results if r.ok]
    steady = [r for r in ok if r.done <= run.issue_end]
    span = run.issue_end - run.t0
    if len(steady) < 2 or span <= 0:
        steady, span = ok, run.wall_s
    return len(steady) / span, sum(r.audio_seconds for r in steady) / span


def summarize(run: Run, *, engine: str, mode: str, api: str, concurrency: int | None, rate: float | None,
              mean_batch_size: float | None) -> LoadPoint:
    ok = [r for r in run.results if r.ok]
    errors = collections.Counter(r.code for r in run.results if not r.ok)
    utt_s, audio_s_s = steady_throughput(run)
    return LoadPoint(
        engine=engine, mode=mode, api=api, concurrency=concurrency, rate=rate,
        requests=len(run.results), ok=len(ok), errors=dict(sorted(errors.items())),
        wall_s=run.wall_s,
        throughput_utt_s=utt_s,
        throughput_audio_s_s=audio_s_s,
        latency_ms=latency_summary(np.array([r.latency_s for r in ok])),
        server_ms=server_breakdown(run),
        mean_batch_size=mean_batch_size,
        max_send_lag_ms=run.max_send_lag_ms,
    )


def scrape_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Prometheus text exposition -> {sample name with labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return samples


def mean_batch_size(before: dict[str, float], after: dict[str, float], metric: str = BATCH_SIZE_METRIC) -> float | None:
    """Mean batch size between two scrapes from the histogram's _sum/_count; None if no batch ran."""
    batches = after.get(f"{metric}_count", 0.0) - before.get(f"{metric}_count", 0.0)
    if batches <= 0:
        return None
    return (after.get(f"{metric}_sum", 0.0) - before.get(f"{metric}_sum", 0.0)) / batches
