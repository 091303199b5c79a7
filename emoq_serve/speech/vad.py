"""Silero VAD on onnxruntime, in its streaming, stateful form, batched across streams.

The model ships inside the `silero-vad` wheel (`silero_vad/data/silero_vad.onnx`); nothing is
fetched. Its contract (the package's `OnnxWrapper` in `silero_vad/utils_vad.py`): at 16 kHz each
step scores one 512-sample window, fed as 576 samples, the previous step's last 64 samples
(the context) followed by the window, with a recurrent `state [2, B, 128]` carried between
steps and `sr` as an int64 scalar. A stream's first step sees 64 zeros as context.

Defaults of `VadParams`, one line of why each:
- threshold 0.5: Silero's own default; its probabilities are near 0 on silence and low noise
  and near 1 inside speech, so the cut point matters little between 0.3 and 0.7.
- neg_threshold threshold - 0.15: Silero's hysteresis; a dip to 0.4 inside a word does not
  start the silence clock.
- min_silence_ms 400: above the pauses inside one sentence (stop closures under 0.1 s, comma
  pauses of espeak and of people around 0.2-0.3 s), below turn-taking gaps (typically 0.5 s and
  up), so one utterance stays one segment and a reply opens a new one.
- min_speech_ms 250: shorter bursts (a click, a cough, a breath) carry no emotion to score.
- max_segment_s 15: bounds the audio held per stream and the model's input length, long enough
  that a single sentence is rarely cut.
- speech_pad_ms 150: Silero's onset fires a window or two into a word and its offset as the
  energy falls, so padding keeps the soft onset and the trailing consonant; kept <= min_silence
  so a segment's end padding is audio already received when it closes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.executors.ort import session_options

log = logging.getLogger(__name__)

#: Samples per VAD step at 16 kHz, and the context carried from the previous step.
WINDOW = 512
CONTEXT = 64


@dataclass(frozen=True)
class VadParams:
    """Segmentation settings (server defaults; clients may tune them within server limits)."""

    threshold: float = 0.5  # speech probability that opens speech
    neg_threshold: float | None = None  # closes speech; None = threshold - 0.15 (hysteresis)
    min_silence_ms: int = 400  # silence that closes a segment
    min_speech_ms: int = 250  # shorter segments are dropped
    max_segment_s: float = 15.0  # a segment still open at this length is cut (forced)
    speech_pad_ms: int = 150  # audio kept before and after each segment's speech

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1); got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be in [0, threshold={self.threshold}]; got {self.neg_threshold}")
        if self.min_silence_ms < WINDOW * 1000 // SAMPLE_RATE:
            raise ValueError(f"min_silence_ms must be >= {WINDOW * 1000 // SAMPLE_RATE} (one VAD window); "
                             f"got {self.min_silence_ms}")
        if self.min_speech_ms < 0:
            raise ValueError(f"min_speech_ms must be >= 0; got {self.min_speech_ms}")
        if not 0 <= self.speech_pad_ms <= self.min_silence_ms:
            raise ValueError(f"speech_pad_ms must be in [0, min_silence_ms={self.min_silence_ms}] (the end padding "
                             f"is silence already received when a segment closes); got {self.speech_pad_ms}")
        # Compared in whole milliseconds (rounded), so 1.001 s holds 701 + 2 * 150 ms despite float error.
        if round(self.max_segment_s * 1000, 6) < self.min_speech_ms + 2 * self.speech_pad_ms or self.max_segment_s > 600:
            raise ValueError(f"max_segment_s must be in [min_speech + 2 * pad, 600] s; got {self.max_segment_s}")

    @property
    def close_threshold(self) -> float:
        """Probability below which a window counts as silence while a segment is open."""
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


@dataclass
class VadState:
    """One stream's recurrent state and the last 64 samples it fed (the next step's context)."""

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))


def default_model_path() -> Path:
    """`silero_vad.onnx` inside the installed `silero-vad` wheel."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (pip install silero-vad); "
                           "voice-activity segmentation needs its ONNX model")
    path = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but {path} is missing; reinstall silero-vad")
    return path


class SileroVad:
    """One ORT session shared by all streams.

    Thread safety: `step` may be called from several threads at once (ORT's `run` is
    thread-safe and the session holds no per-stream data); one `VadState` must not be stepped
    by two threads at the same time, which a stream's single owner guarantees.
    """

    def __init__(self, model_path: str | Path | None = None, threads: int = 1) -> None:
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        self.session = ort.InferenceSession(str(self.model_path), sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def new_state(self) -> VadState:
        """A fresh stream: zero recurrent state and 64 zero samples of context."""
        return VadState()

    def step(self, states: list[VadState], windows: np.ndarray) -> np.ndarray:
        """Score one 512-sample window per stream, [B, 512] float32 -> speech probabilities [B];
        updates each stream's state and context in place."""
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape != (len(states), WINDOW):
            raise ValueError(f"windows must be [{len(states)}, {WINDOW}] (one per state); got {windows.shape}")
        if not states:
            return np.zeros(0, np.float32)
        x = np.concatenate([np.stack([s.context for s in states]), windows], axis=1)
        state = np.concatenate([s.state for s in states], axis=1)
        prob, new_state = self.session.run(None, {"input": x, "state": state, "sr": self._sr})
        for i, s in enumerate(states):
            s.state = np.ascontiguousarray(new_state[:, i:i + 1])
            s.context = x[i, -CONTEXT:].copy()
        return prob[:, 0].astype(np.float32, copy=False)

    def scores(self, state: VadState, windows: np.ndarray) -> np.ndarray:
        """One stream's windows [k, 512] in order, one step each -> probabilities [k]."""
        return np.array([self.step([state], w[None])[0] for w in windows], np.float32)


@dataclass
class _Job:
    state: VadState
    windows: np.ndarray  # [k, WINDOW]
    future: Future[np.ndarray]
    probs: np.ndarray
    pos: int = 0


class VadBatcher:
    """Scores the windows of many streams together on one thread of its own.

    A stream's windows are sequential (each step carries its recurrent state to the next), but
    different streams are independent: each tick scores the next pending window of every waiting
    stream as one batch, up to `max_batch`: a batch costs far less per window than single steps
    (`benchmarks/bench_vad.py`). A stream submits one job at a time (its owner
    awaits the result before feeding more), so its state is never stepped twice at once.
    """

    def __init__(self, vad: SileroVad, max_batch: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self.vad, self.max_batch, self.on_batch = vad, max_batch, on_batch
        self.steps = 0  # batched ORT calls so far
        self.windows = 0  # windows scored so far (windows / steps = mean batch)
        self.largest_batch = 0
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._busy_since: float | None = None  # monotonic start of the model step in progress
        self._thread = threading.Thread(target=self._run, name="emoq-vad", daemon=True)
        self._thread.start()

    def healthy(self, stall_timeout_s: float = 10.0) -> bool:
        """The thread runs and no model step has taken longer than `stall_timeout_s` (a step is one
        512-sample window per stream: milliseconds when healthy). What gRPC health reports."""
        since = self._busy_since
        stuck = since is not None and time.monotonic() - since > stall_timeout_s
        return self._thread.is_alive() and not stuck

    def submit(self, state: VadState, windows: np.ndarray) -> Future[np.ndarray]:
        """Queue one stream's windows [k, 512]; the future gives their probabilities [k]."""
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[1] != WINDOW:
            raise ValueError(f"windows must be [k, {WINDOW}]; got {windows.shape}")
        future: Future[np.ndarray] = Future()
        if not len(windows):
            future.set_result(np.zeros(0, np.float32))
            return future
        with self._cv:
            if self._closed:
                raise RuntimeError("the VAD batcher is closed")
            self._queue.append(_Job(state, windows, future, np.zeros(len(windows), np.float32)))
            self._cv.notify()
        return future

    async def score(self, state: VadState, windows: np.ndarray) -> np.ndarray:
        return await asyncio.wrap_future(self.submit(state, windows))

    def close(self) -> None:
        """Stop the thread once the jobs already queued are scored."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            with self._cv:
                while not self._queue and not active and not self._closed:
                    self._cv.wait()
                if not self._queue and not active:
                    return
                while self._queue and len(active) < self.max_batch:
                    job = self._queue.popleft()
                    if job.future.set_running_or_notify_cancel():  # False: its call is gone
                        active.append(job)
            if not active:
                continue
            self._busy_since = time.monotonic()
            try:
                probs = self.vad.step([j.state for j in active], np.stack([j.windows[j.pos] for j in active]))
            except Exception as exc:  # a broken model fails the jobs it was scoring, not the thread
                for job in active:
                    job.future.set_exception(exc)
                active = []
                continue
            finally:
                self._busy_since = None
            self.steps += 1
            self.windows += len(active)
            self.largest_batch = max(self.largest_batch, len(active))
            if self.on_batch is not None:
                try:
                    self.on_batch(len(active))
                except Exception:  # a metrics hook must never stop every stream's VAD
                    log.exception("VAD on_batch hook failed")
            still: list[_Job] = []
            for job, p in zip(active, probs):
                job.probs[job.pos] = p
                job.pos += 1
                if job.pos == len(job.windows):
                    job.future.set_result(job.probs)
                else:
                    still.append(job)
            active = still
