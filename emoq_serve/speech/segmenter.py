"""Cut one audio stream into speech segments as it arrives (VOICE_ACTIVITY mode).

Per 512-sample window the Silero VAD gives a speech probability; the decisions follow the
package's `get_speech_timestamps`, made causal:

- a window at or above `threshold` opens a segment (if none is open) and ends any silence run;
- while open, a window below `neg_threshold` starts a silence run (hysteresis: windows between
  the two thresholds neither start nor end one); once the run reaches `min_silence_ms`, the
  segment closes at the run's start, plus `speech_pad_ms`;
- a segment starts `speech_pad_ms` before its first speech window, but never before the end of
  the previous segment, so segments never overlap;
- a segment still open at `max_segment_s` is cut (forced): during a silence run at its padded
  end, otherwise at the least speech-like window of its last second, and the rest of the speech
  continues as the next segment;
- segments with less than `min_speech_ms` of speech (first speech window to silence) are dropped.

Every decision is per window, so how the stream is chunked never changes the segments. Memory:
the audio held is the open segment (at most `max_segment_s`) or, between segments, the last
`speech_pad_ms` (the next segment's pre-padding), plus one partial window; never the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.speech.vad import WINDOW, SileroVad, VadParams, VadState

#: How far back from the length limit a forced cut looks for a pause between words.
_CUT_SEARCH_S = 1.0


@dataclass
class Segment:
    """One speech segment; offsets are seconds from the stream's first sample, after padding, and
    `audio` is exactly samples [round(start_s * 16000), round(end_s * 16000)) of the stream."""

    index: int
    start_s: float
    end_s: float
    audio: np.ndarray
    forced: bool = False  # cut at max_segment_s rather than closed by silence

    @property
    def start_sample(self) -> int:
        return round(self.start_s * SAMPLE_RATE)

    @property
    def end_sample(self) -> int:
        return round(self.end_s * SAMPLE_RATE)


def _ms(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000))


class Segmenter:
    """Per-stream state machine over the VAD's window probabilities. Not thread-safe: one owner
    feeds it (the VAD it shares with other streams is)."""

    def __init__(self, vad: SileroVad, params: VadParams) -> None:
        self.vad, self.params = vad, params
        self._state = vad.new_state()
        self._on, self._off = params.threshold, params.close_threshold
        self._pad = _ms(params.speech_pad_ms)
        self._min_silence = _ms(params.min_silence_ms)
        self._min_speech = _ms(params.min_speech_ms)
        self._max_len = int(round(params.max_segment_s * SAMPLE_RATE))
        # Held audio: samples [_held_from, _consumed) of the stream in _store[:_n].
        self._store = np.zeros(self._pad + 2 * WINDOW, np.float32)
        self._n = 0
        self._held_from = 0
        self._pending = np.zeros(0, np.float32)  # fed, not yet a whole window
        self._consumed = 0  # samples the VAD has scored (a multiple of WINDOW)
        self._total = 0
        self._index = 0
        self._finished = False
        # The open segment.
        self._open = False
        self._seg_start = 0  # padded start
        self._speech_start = 0  # first speech window (or the cut a forced segment continues from)
        self._silence_from: int | None = None  # start of the current silence run, if any
        self._probs: list[tuple[int, float]] = []  # (window start, prob) inside the open segment
        self._prev_end = 0  # end of the last emitted segment

    # -- public API ------------------------------------------------------------------------------

    @property
    def total_samples(self) -> int:
        """Samples fed so far."""
        return self._total

    @property
    def buffered_samples(self) -> int:
        """Samples held now: the open segment (or the pre-padding ring) plus a partial window."""
        return self._n + len(self._pending)

    @property
    def vad_state(self) -> VadState:
        """The stream's VAD state, for a `VadBatcher` that scores this stream's windows."""
        return self._state

    def feed(self, audio: np.ndarray) -> list[Segment]:
        """Add 16 kHz float32 mono audio of any length; returns the segments it closed, in order.
        Scores the windows one step at a time; a server batches streams' steps instead, with
        `split`, a `VadBatcher` and `advance`."""
        windows = self.split(audio)
        return self.advance(windows, self.vad.scores(self._state, windows))

    def split(self, audio: np.ndarray) -> np.ndarray:
        """Take audio of any length; return the whole windows [k, 512] now ready for the VAD (the
        remainder waits for the next call). Pass them, scored, to `advance` before splitting more."""
        if self._finished:
            raise RuntimeError("feed() after finish(): this stream has ended")
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"audio must be 1-D mono samples; got shape {x.shape}")
        self._total += len(x)
        if len(self._pending):
            x = np.concatenate([self._pending, x])
        n_windows = len(x) // WINDOW
        self._pending = x[n_windows * WINDOW:].copy()
        return x[:n_windows * WINDOW].reshape(n_windows, WINDOW)

    def advance(self, windows: np.ndarray, probs: np.ndarray) -> list[Segment]:
        """Run the state machine over `split`'s windows and their VAD probabilities; returns the
        segments closed, in order."""
        if len(windows) != len(probs):
            raise ValueError(f"{len(windows)} windows but {len(probs)} probabilities")
        out: list[Segment] = []
        for w, prob in zip(windows, probs):
            out += self._advance(w, float(prob))
        if out:  # a closed segment's audio now lives in the Segment: stop holding it here too
            self._trim()
        return out

    def finish(self) -> list[Segment]:
        """End of stream: close the open segment (the partial window counts as its audio) if it
        holds at least `min_speech_ms` of speech."""
        if self._finished:
            return []
        self._finished = True
        if not self._open:
            return []
        self._append(self._pending)
        self._pending = np.zeros(0, np.float32)
        speech_end = self._silence_from if self._silence_from is not None else self._total
        end = min(speech_end + self._pad, self._total)
        return self._close(end, speech_end, forced=False)

    def open_segment(self) -> Segment | None:
        """The open segment so far (scored audio only), for interim results; None between segments."""
        if not self._open or self._consumed <= self._seg_start:
            return None
        return self._segment(self._seg_start, self._consumed, forced=False)

    # -- the state machine -------------------------------------------------------------------------

    def _advance(self, window: np.ndarray, prob: float) -> list[Segment]:
        cur = self._consumed
        self._append(window)
        self._consumed += WINDOW
        out: list[Segment] = []
        if prob >= self._on:
            self._silence_from = None
            if not self._open:
                self._open = True
                self._speech_start = cur
                self._seg_start = max(cur - self._pad, self._prev_end, self._held_from)
                self._probs = []
        elif prob < self._off and self._open:
            if self._silence_from is None:
                self._silence_from = cur
            if cur - self._silence_from >= self._min_silence:
                speech_end = self._silence_from
                out += self._close(speech_end + self._pad, speech_end, forced=False)
        if self._open:
            self._probs.append((cur, prob))
            if self._consumed - self._seg_start >= self._max_len:
                out += self._forced_cut()
        return out

    def _forced_cut(self) -> list[Segment]:
        limit = self._seg_start + self._max_len
        if self._silence_from is not None:  # speech already ended: close at its padded end
            speech_end = self._silence_from
            return self._close(min(speech_end + self._pad, limit), speech_end, forced=True)
        # Cut where speech is least likely in the last second (a pause between words), keeping
        # at least min_speech before it; the rest continues as the next segment.
        lo = max(limit - int(_CUT_SEARCH_S * SAMPLE_RATE), self._seg_start + self._min_speech + 1)
        candidates = [(p, -s) for s, p in self._probs if lo <= s <= limit]
        cut = -min(candidates)[1] if candidates else limit
        out = self._close(cut, cut, forced=True)
        self._open = True
        self._seg_start = self._speech_start = cut
        self._probs = [(s, p) for s, p in self._probs if s >= cut]
        return out

    def _close(self, end: int, speech_end: int, forced: bool) -> list[Segment]:
        out = []
        if speech_end - self._speech_start > self._min_speech:
            out.append(self._segment(self._seg_start, end, forced))
            self._index += 1
            self._prev_end = end
        self._open = False
        self._silence_from = None
        self._probs = []
        return out

    def _segment(self, start: int, end: int, forced: bool) -> Segment:
        audio = self._store[start - self._held_from:end - self._held_from].copy()
        return Segment(self._index, start / SAMPLE_RATE, end / SAMPLE_RATE, audio, forced)

    def _trim(self) -> None:
        """Drop the held audio no segment can still need."""
        keep = self._seg_start if self._open else max(self._consumed - self._pad, self._prev_end)
        drop = min(keep - self._held_from, self._n)
        if drop > 0:
            self._store[:self._n - drop] = self._store[drop:self._n]
            self._n -= drop
            self._held_from += drop

    def _append(self, x: np.ndarray) -> None:
        """Hold `x` (the next samples), first dropping what no segment can still need."""
        self._trim()
        need = self._n + len(x)
        if need > len(self._store):
            # Doubling, but not past what the longest segment needs, so a stream holds at most that.
            grown = np.zeros(max(min(2 * len(self._store), self._max_len + 2 * WINDOW), need), np.float32)
            grown[:self._n] = self._store[:self._n]
            self._store = grown
        self._store[self._n:need] = x
        self._n = need
