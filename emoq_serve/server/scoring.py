"""What both request kinds call to turn a decoded utterance into an `EmotionResult`.

A unary call, an UTTERANCE stream and every VOICE_ACTIVITY segment go the same way: decode on a
worker thread (`off_loop`), decide the transcript (the client's, the server's ASR, or none), score
through the shared dynamic batcher under the call's deadline, and build the result message.
The servicer and the conversation stream both hold a `Scorer`; neither imports the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.engine.batcher import DynamicBatcher
from emoq_serve.executors.types import Prediction, Recognizer, Utterance
from emoq_serve.server.config import ServerConfig
from emoq_serve.server.telemetry import RESULT_STAGES, ServerMetrics
from emoq_serve.server.transcripts import Transcript, TranscriptStage
from emoq_serve.server.validation import InvalidRequest

T = TypeVar("T")


def next_interim(seconds: float, span: float) -> float:
    """The next interim point after `seconds` of audio: the next whole multiple of `span`, so a
    slow model skips interim points instead of queueing a backlog of stale ones."""
    return (math.floor(seconds / span) + 1) * span


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() instant (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Scorer:
    """Decoding workers, the transcript stage and the batcher, shared by every call."""

    def __init__(self, recognizer: Recognizer, batcher: DynamicBatcher, metrics: ServerMetrics, cfg: ServerConfig,
                 transcripts: TranscriptStage | None = None) -> None:
        self.recognizer, self.batcher, self.metrics, self.cfg = recognizer, batcher, metrics, cfg
        self.transcripts = transcripts or TranscriptStage(None, "off")
        # Decoding, resampling (and VAD) run here, so a large chunk never stalls the event loop
        # that every other stream's messages and results go through.
        self._workers = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="emoq-decode")

    async def off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on a decode worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    @functools.cached_property
    def context_turns(self) -> int:
        """Earlier turns the served model reads (0: none); conversation streams keep that many."""
        return int(self.recognizer.info().get("context_turns", "0"))

    async def recognize_utterance(
        self, utterance: Utterance, context: grpc.aio.ServicerContext, final: bool, started: float,
        asr_mode: int = pb.ASR_SERVER_DEFAULT,
    ) -> pb.EmotionResult:
        """One utterance (or segment): its transcript (client's, ASR's or none), then `score`.

        An interim result (`final` False) never runs ASR: it looks at audio still arriving, and
        transcribing each one would re-run Whisper over a growing prefix. It reads the client's
        transcript or none; the final result gets the ASR transcript."""
        mode = asr_mode if final else pb.ASR_OFF
        transcript = await self.transcripts.transcript_for(utterance, mode, deadline_of(context))
        return await self.score(dataclasses.replace(utterance, transcript=transcript.text), transcript, context,
                                final, started)

    @functools.cached_property
    def text_only(self) -> bool:
        """Whether the served model reads the transcript alone (GetModelInfo's MODALITY_TEXT_ONLY)."""
        return self.recognizer.info().get("modality", "both") == "text"

    def check_transcript(self, transcript: Transcript) -> None:
        """A text-only model without a transcript has nothing to answer from (it would score the
        former's queries alone): refuse, saying where a transcript can come from."""
        if not self.text_only or transcript.text.strip():
            return
        if transcript.source == pb.TRANSCRIPT_ASR:
            where = "the server's ASR heard no words in this audio; send the transcript yourself"
        elif self.transcripts.asr is None:
            where = ("this server runs without ASR, so send the transcript (RecognitionConfig.transcript, or a "
                     "SegmentTranscript in VOICE_ACTIVITY streams)")
        else:
            where = ("send the transcript (RecognitionConfig.transcript, or a SegmentTranscript), or let the "
                     "server's ASR transcribe the audio (asr ASR_AUTO or ASR_ALWAYS; interim results never run "
                     "ASR, so a text-only model's interims need the transcript in the config)")
        raise InvalidRequest(f"the served model is text-only (GetModelInfo modality MODALITY_TEXT_ONLY): it answers "
                             f"from the transcript alone, and this utterance has none: {where}")

    async def score(self, utterance: Utterance, transcript: Transcript, context: grpc.aio.ServicerContext,
                    final: bool, started: float) -> pb.EmotionResult:
        """An utterance whose transcript is decided, through the shared batcher under the call's deadline."""
        self.check_transcript(transcript)
        prediction = await self.batcher.submit(utterance, deadline_of(context))
        seconds = len(utterance.audio) / SAMPLE_RATE
        result = self.result(prediction, seconds, final, started, transcript)
        # UTTERANCE mode: segment 0 spans the whole audio (VOICE_ACTIVITY overwrites these).
        result.end_s, result.speaker = seconds, utterance.speaker or ""
        return result

    def result(
        self, prediction: Prediction, audio_seconds: float, final: bool, started: float,
        transcript: Transcript = Transcript("", pb.TRANSCRIPT_NONE),
    ) -> pb.EmotionResult:
        if not np.isfinite(prediction.probabilities).all():  # never hand a client NaN as an answer
            raise ValueError(f"the engine returned non-finite scores {prediction.probabilities.tolist()}")
        total_ms = (time.monotonic() - started) * 1e3
        timings_ms = {**prediction.timings_ms, "asr": transcript.asr_ms} if transcript.asr_ms else prediction.timings_ms
        self.metrics.observe_result(timings_ms, total_ms)
        timing = pb.Timing(total_ms=total_ms, **{f"{s}_ms": timings_ms.get(s, 0.0) for s in RESULT_STAGES})
        scores = [
            pb.ClassScore(label=label, probability=float(p))
            for label, p in zip(self.recognizer.labels, prediction.probabilities, strict=True)
        ]
        return pb.EmotionResult(
            label=prediction.label, scores=scores, is_final=final, audio_seconds=audio_seconds, timing=timing,
            transcript=transcript.text, transcript_source=transcript.source, asr=transcript.asr_run,
        )
