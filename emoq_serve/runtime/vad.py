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

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.runtime.ort import session_options

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
        if self.max_segment_s * 1000 < self.min_speech_ms + 2 * self.speech_pad_ms or self.max_segment_s > 600:
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
