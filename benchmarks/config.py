"""`BenchConfig`: everything one `emoq bench` run does, as one typed value (the CLI fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from benchmarks.loadgen import Budget
from benchmarks.target import Api
from benchmarks.workload import WorkloadConfig

#: Engine names in reports -> the `emoq serve` flags that select them. The eager baseline runs in
#: both precisions so the optimised engine is compared with the best plain PyTorch loop too.
ENGINE_FLAGS = {
    "eager": ("--engine", "eager", "--dtype", "float32"),
    "eager-bf16": ("--engine", "eager", "--dtype", "bfloat16"),
    "onnx": ("--engine", "onnx"),
}
ENGINES = tuple(ENGINE_FLAGS)
BASELINES = ("eager", "eager-bf16")


@dataclass
class BenchConfig:
    """Target (a running server, or a bundle the harness serves itself), load shape and output.

    With `bundle` set and `server` unset, each engine in `engines` is served in turn from the
    bundle; with `server` set, that server is measured and `engines` holds the one name it is
    reported under (the bundle, if given too, is only read for its model config and tokenizers).
    """

    server: str | None = None
    bundle: Path | None = None
    engines: tuple[str, ...] = ("onnx",)
    mode: Literal["closed", "open"] = "closed"
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    rates: tuple[float, ...] = (1.0,)
    api: Api = "unary"
    chunk_ms: float = 100.0
    realtime: bool = False
    budget: Budget = field(default_factory=lambda: Budget(duration_s=30.0, warmup=4))
    #: Times every engine's load points are measured (engines interleaved); the report gives
    #: medians and the spread.
    repeats: int = 1
    seed: int = 0
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    out: Path = Path("runs/bench")
    #: Extra `emoq serve` flags for servers the harness starts (e.g. "--max-batch 16").
    serve_args: str = ""
    #: Prometheus endpoint of `server` (servers the harness starts are scraped automatically).
    metrics_url: str | None = None
    timeout_s: float = 300.0
    #: Seconds per matmul-peak measurement (best-of repeats within it).
    peak_seconds: float = 1.0
    #: --api conversation: each stream's conversation length, whether streams send the generator's
    #: transcripts (else the server's ASR, when on, supplies them), what counts as sustained, and
    #: the pid of a --server to sample its memory (servers the harness starts are sampled anyway).
    conversation_seconds: float = 180.0
    client_transcripts: bool = True
    latency_bound_ms: float = 3000.0
    #: Noise on a few-minute run is tens of ms/min; falling 5 % behind real time is ~3000 ms/min.
    max_slope_ms_per_min: float = 500.0
    server_pid: int | None = None
    #: The command line, recorded in the report so a result can be reproduced.
    command: str = ""

    def __post_init__(self) -> None:
        if (self.server is None) and (self.bundle is None):
            raise ValueError("give --server host:port or --bundle DIR")
        if self.server is not None and len(self.engines) != 1:
            raise ValueError("against a running --server, name exactly one engine (the one it serves)")
        unknown = set(self.engines) - set(ENGINES)
        if unknown:
            raise ValueError(f"unknown engine(s) {sorted(unknown)}; choose from {ENGINES}")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if self.mode == "closed" and (not self.concurrency or min(self.concurrency) < 1):
            raise ValueError("closed loop needs concurrencies >= 1")
        if self.api == "conversation" and (self.mode != "closed" or self.conversation_seconds < 5.0):
            raise ValueError("--api conversation runs --concurrency streams (closed mode) of "
                             "--conversation-seconds >= 5 each")
        if self.mode == "open" and (not self.rates or min(self.rates) <= 0):
            raise ValueError("open loop needs rates > 0")
