"""Run an `EmotionServer` on 127.0.0.1 in a background event-loop thread for tests.

The server (and any async engine inside the recognizer) lives on its own loop, exactly as under
`emoq serve`; tests talk to it over real gRPC with the blocking client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from emoq_serve._proto import emoq_pb2_grpc as pb_grpc
from emoq_serve.executors.types import Prediction, Recognizer, Utterance
from emoq_serve.server.app import EmotionServer
from emoq_serve.server.config import ServerConfig

T = TypeVar("T")


class StandInRecognizer:
    """A cheap deterministic engine: posteriors from simple audio/transcript statistics."""

    labels = ("neutral", "angry", "sad", "happy")

    def info(self) -> dict[str, str]:
        return {"bundle_id": "standin", "preset": "none", "numpy": np.__version__}

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        out = []
        for u in batch:
            logits = np.array(
                [np.abs(u.audio).mean() * 10, u.audio.std() * 5, len(u.audio) / 16_000, len(u.transcript) / 10],
                dtype=np.float64,
            )
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out.append(Prediction(self.labels[int(p.argmax())], p.astype(np.float32), {"llm": 0.1}))
        return out

    async def close(self) -> None:
        pass


class GatedRecognizer:
    """Wraps a recognizer; while the gate is shut, batches wait (deterministic queue tests)."""

    def __init__(self, inner: Recognizer) -> None:
        self.inner = inner
        self.labels = inner.labels
        self.gate = asyncio.Event()
        self.gate.set()
        self.batch_sizes: list[int] = []

    def info(self) -> dict[str, str]:
        return self.inner.info()

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        self.batch_sizes.append(len(batch))
        await self.gate.wait()
        return await self.inner.recognize(batch)

    async def close(self) -> None:
        await self.inner.close()


class RunningServer:
    """`with RunningServer(make_recognizer, cfg) as srv:` then `srv.stub.Recognize(...)`."""

    def __init__(
        self,
        make_recognizer: Callable[[], Recognizer],
        cfg: ServerConfig,
        count_tokens: Callable[[str], int] | None = None,
        asr: object | None = None,  # an AsrEngine the caller owns (None: the server runs without ASR)
    ) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.recognizer = self.run(self._make(make_recognizer))
        self.server = EmotionServer(self.recognizer, cfg, count_tokens, asr)
        self.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.EmotionRecognizerStub(self.channel)

    @staticmethod
    async def _make(make: Callable[[], Recognizer]) -> Recognizer:
        return make()  # on the server loop: async engines bind to the loop they start on

    def run(self, coro: Awaitable[T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop())
        self.run(self.recognizer.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def config(batcher: dict[str, Any] | None = None, supervisor: dict[str, Any] | None = None,
           **changes: object) -> ServerConfig:
    """Test defaults: ephemeral ports, short delays, a short drain. `batcher` and `supervisor` change
    fields of the server's own `BatcherConfig` / `SupervisorConfig` (dicts: `spawn_server` sends JSON)."""
    base = ServerConfig(port=0, metrics_port=0, drain_timeout_s=5.0, max_audio_seconds=10.0)
    return base.replace(
        batcher=dataclasses.replace(base.batcher, **{"max_queue_delay_ms": 2.0, **(batcher or {})}),
        supervisor=dataclasses.replace(base.supervisor, **(supervisor or {})),
        **changes,
    )


def tone(seconds: float, sr: int = 16_000, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


#: A stand-in server process: `python -c SERVER_SCRIPT TESTS_DIR DELAY_S CONFIG_JSON`. Prints its
#: port, serves until SIGTERM/SIGINT (draining), then prints "stopped". `DELAY_S` is the engine's
#: compute time per batch.
SERVER_SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from server_harness import StandInRecognizer, config
from emoq_serve.server.app import EmotionServer

class Timed(StandInRecognizer):
    async def recognize(self, batch):
        await asyncio.sleep(float(sys.argv[2]))
        return await super().recognize(batch)

async def main():
    server = EmotionServer(Timed(), config(metrics_port=None, **json.loads(sys.argv[3])))
    await server.start()
    server.stop_on_signals()
    print(server.port, flush=True)
    await server.wait_stopped()
    print("stopped", flush=True)

asyncio.run(main())
"""


def spawn_server(delay_s: float = 0.0, **changes: object) -> tuple[subprocess.Popen[str], int]:
    """Start a stand-in server in its own process (for signals and per-process memory); returns
    (process, port). The caller kills it if it is still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(Path(__file__).parent), str(delay_s), json.dumps(changes)],
        stdout=subprocess.PIPE, text=True,
    )
    return proc, int(proc.stdout.readline())
