"""Statistics of one load point: latency percentiles, throughput, errors, server-side breakdown.

The server-side breakdown comes from each response's timing fields (what the server measured per
stage); the mean batch size comes from the server's Prometheus endpoint, scraped before and after
the load point, so it covers exactly the measured calls plus nothing else (warm-up is scraped
away). Both are reported next to the client's end-to-end latency, so the gap between client and
server time (network, serialisation, client overhead) is visible too.
"""

from __future__ import annotations

import collections
import json
import urllib.request
from pathlib import Path
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
    #: Which run of `emoq bench --repeats` measured it (0-based).
    repeat: int = 0

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


def batch_trace(path: Path, start: float, end: float) -> dict[str, float] | None:
    """Batches the server's batcher traced (`EMOQ_BATCH_TRACE`) that started in [start, end]
    (`time.monotonic()`, one clock for every process): how many, their mean size, and the padding
    fraction a zero-padded batch computes (padded samples / all samples, both over the batches'
    longest clip times their size). None when no batch was traced there."""
    if not path.exists():
        return None
    batches = [b for b in map(json.loads, path.read_text().splitlines()) if start <= b["start"] <= end]
    if not batches:
        return None
    sizes = [len(b["samples"]) for b in batches]
    padded = sum(max(b["samples"]) * len(b["samples"]) for b in batches)
    real = sum(sum(b["samples"]) for b in batches)
    return {"batches": len(batches), "mean_batch": sum(sizes) / len(sizes),
            "padding_fraction": 1.0 - real / padded if padded else 0.0}


def median_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (engine, load) over the repeats: medians of throughput, latency percentiles,
    stage times and mean batch, with `spread` (min, max) of throughput and p50. The rest (CPU per
    thread group, batches, efficiency) is the run whose throughput is the median's."""
    groups: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for p in points:
        groups[(p["engine"], p["mode"], p["concurrency"], p["rate"])].append(p)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda p: p["throughput_utt_s"])
        point = {**runs[(len(runs) - 1) // 2], "repeats": len(runs)}
        point.pop("repeat", None)
        med = lambda values: float(np.median(values)) if values else None  # noqa: E731
        point["throughput_utt_s"] = med([p["throughput_utt_s"] for p in runs])
        point["throughput_audio_s_s"] = med([p["throughput_audio_s_s"] for p in runs])
        keys = set.intersection(*(set(p["latency_ms"]) for p in runs))
        point["latency_ms"] = {k: med([p["latency_ms"][k] for p in runs]) for k in sorted(keys)}
        stages = set.intersection(*(set(p["server_ms"]) for p in runs))
        point["server_ms"] = {k: med([p["server_ms"][k] for p in runs]) for k in sorted(stages)}
        batches = [p["mean_batch_size"] for p in runs if p["mean_batch_size"] is not None]
        point["mean_batch_size"] = med(batches)
        point["ok"], point["requests"] = sum(p["ok"] for p in runs), sum(p["requests"] for p in runs)
        point["errors"] = dict(sum((collections.Counter(p["errors"]) for p in runs), collections.Counter()))
        p50 = [p["latency_ms"]["p50"] for p in runs if "p50" in p["latency_ms"]]
        point["spread"] = {"throughput_utt_s": [runs[0]["throughput_utt_s"], runs[-1]["throughput_utt_s"]],
                           "p50_ms": [min(p50), max(p50)] if p50 else None}
        out.append(point)
    return out
