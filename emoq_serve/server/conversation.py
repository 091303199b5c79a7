"""VOICE_ACTIVITY streams: one long stream in, one final result per speech segment out.

Per call, a reader task takes the client's messages (decoding and resampling on the service's
worker threads, the VAD on its `VadBatcher` thread, batched with the other streams'), and every segment the `Segmenter` closes becomes a scoring task at
once: wait (bounded) for the segment's client transcript, then go through the shared dynamic
batcher, so segments of many streams batch together. Results leave in the order their tasks
were made (segment order, interims in between), each as soon as it and the ones before it are
done. Interim results describe only the open segment (at most `max_segment_s` of audio) with at
most one in flight, so a long stream never re-scores a growing prefix.

Segment transcripts (`SegmentTranscript`) attach by segment index, or by time range to the
segment that overlaps the range most. A segment waits up to `segment_transcript_wait_ms` (the
client's value, capped by the server) after it closes; with none by then, or once the client
half-closed, it is scored with the server's ASR transcript (`--asr auto`, the default) or, with
ASR off, without one (TRANSCRIPT_NONE).

Dialogue context: a bundle whose former reads the earlier turns (`context_turns` K > 0) gets,
with each segment, the last K decided transcripts of this stream and their speakers, past only:
a segment's transcript is decided first (client's or ASR's), then it waits for the segments
before it to be decided, so the turns it reads are exactly the stream's earlier ones in order.
Interim results read the turns decided so far.

Memory: the segmenter holds the open segment (bounded); closed segments are held until their
result is sent; pending transcripts are bounded by `max_pending_segment_transcripts`. All of it
is reported to the server-wide `StreamTicket` after every message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.executors.types import Turn, Utterance
from emoq_serve.speech.vad import VadBatcher, VadParams
from emoq_serve.server.config import ServerConfig
from emoq_serve.server.limits import ServerBusy, StreamTicket
from emoq_serve.server.scoring import Scorer, deadline_of, next_interim
from emoq_serve.server.status import status_for
from emoq_serve.speech.segmenter import Segment, Segmenter
from emoq_serve.server.streams import StreamAssembler
from emoq_serve.server.validation import InvalidRequest, config_context


log = logging.getLogger(__name__)


#: Finished results a stream may have waiting for its client to read them before the stream ends
#: (they hold no audio, so a few dozen cost nothing).
MAX_UNSENT_RESULTS = 64


def vad_params(cfg: ServerConfig, va: pb.VoiceActivityConfig) -> VadParams:
    """The client's VAD settings (0 = the server's default), clamped to the server's limits."""
    d = cfg.vad or VadParams()
    values = (va.speech_threshold, va.min_silence_ms, va.min_speech_ms, va.max_segment_s, va.speech_pad_ms)
    if not all(math.isfinite(v) for v in values):
        raise InvalidRequest(f"voice_activity settings must be finite numbers; got {list(values)}")

    def pick(value: float, default: float, lo: float, hi: float) -> float:
        return default if value == 0 else min(max(value, lo), hi)

    threshold = pick(va.speech_threshold, d.threshold, 0.05, 0.95)
    min_silence = int(pick(va.min_silence_ms, d.min_silence_ms, 100, 5_000))
    min_speech = int(pick(va.min_speech_ms, d.min_speech_ms, 0, 5_000))
    # Clamped after the default is chosen: the default pad may exceed a client's short silence.
    pad = int(min(pick(va.speech_pad_ms, d.speech_pad_ms, 0, 1_000), min_silence))
    longest = min(cfg.max_segment_s, cfg.max_audio_seconds)  # a segment is one model input
    max_segment = pick(va.max_segment_s, min(d.max_segment_s, longest), 1.0, longest)
    # VadParams' own consistency rule, rounded up to whole milliseconds so float error cannot break it.
    max_segment = max(max_segment, math.ceil(min_speech + 2 * pad) / 1000)
    if max_segment > longest:
        raise InvalidRequest(f"voice_activity.min_speech_ms + 2 * speech_pad_ms is longer than this server's longest "
                             f"segment ({longest:g} s): lower them")
    try:
        return VadParams(threshold=threshold, min_silence_ms=min_silence, min_speech_ms=min_speech,
                         max_segment_s=max_segment, speech_pad_ms=pad)
    except ValueError as exc:  # settings that clash after clamping: the client's to fix
        raise InvalidRequest(f"voice_activity settings clash: {exc}") from None


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class SegmentTranscripts:
    """A stream's transcripts that arrived before (or while) their segment waits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending: list[pb.SegmentTranscript] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, st: pb.SegmentTranscript) -> None:
        if len(self._pending) >= self.limit:
            raise InvalidRequest(f"{self.limit} segment transcripts are waiting for segments that have not closed: "
                                 "send each one near its segment (by index or time range), not far ahead")
        self._pending.append(st)

    def find(self, index: int, start_s: float, end_s: float, take: bool) -> pb.SegmentTranscript | None:
        """The transcript for segment `index` spanning [start_s, end_s): by index, or a range this
        segment overlaps at least as much as any later segment could (they start at >= end_s)."""
        for i, st in enumerate(self._pending):
            if st.WhichOneof("target") == "segment_index":
                hit = st.segment_index == index
            else:
                r = st.time_range
                ov = _overlap(start_s, end_s, r.start_s, r.end_s)
                hit = ov > 0 and ov >= r.end_s - end_s
            if hit:
                return self._pending.pop(i) if take else st
        return None

    def prune(self, next_index: int, closed_end_s: float) -> None:
        """Drop transcripts no segment can take any more (every earlier segment is decided)."""
        def alive(st: pb.SegmentTranscript) -> bool:
            if st.WhichOneof("target") == "segment_index":
                return st.segment_index >= next_index
            return st.time_range.end_s > closed_end_s

        kept = [st for st in self._pending if alive(st)]
        if len(kept) != len(self._pending):
            log.debug("dropped %d segment transcript(s) that matched no open segment", len(self._pending) - len(kept))
        self._pending = kept


class ConversationStream:
    """One VOICE_ACTIVITY call (see the module docstring)."""

    def __init__(self, scorer: Scorer, stream: StreamAssembler, context: grpc.aio.ServicerContext,
                 ticket: StreamTicket, vad: VadBatcher) -> None:
        assert stream.config is not None
        self.scorer, self.stream, self.context, self.ticket = scorer, stream, context, ticket
        self.cfg: ServerConfig = scorer.cfg
        self.config = stream.config
        self.vad = vad
        self.segmenter = Segmenter(vad.vad, vad_params(self.cfg, self.config.voice_activity))
        self.wait_s = min(self.config.segment_transcript_wait_ms, self.cfg.max_segment_transcript_wait_ms) / 1e3
        self.transcripts = SegmentTranscripts(self.cfg.max_pending_segment_transcripts)
        self._out: asyncio.Queue[asyncio.Task[pb.EmotionResult | None] | BaseException | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[object]] = set()
        self._interim: asyncio.Task[pb.EmotionResult | None] | None = None
        self._arrival = asyncio.Event()  # set (and replaced) whenever a segment transcript arrives
        self._ended = False  # half-closed: no transcript can arrive any more
        self._undecided = 0  # closed segments still waiting for their transcript
        self._next_index = 0  # segments closed so far
        self._closed_end_s = 0.0
        self._closed_samples = 0  # audio of closed segments whose result is not sent yet
        self._in_work = 0  # closed segments past their client-transcript wait: being transcribed or scored
        self._slot_free = asyncio.Event()  # set whenever a segment's work ends
        self._unsent = 0  # results queued for the client (in work or done)
        # Dialogue context (a model with context_turns K > 0): the last K decided turns, appended
        # in segment order; each segment's future is set once its turn is in (or skipped).
        self._history: collections.deque[Turn] = collections.deque(
            (t for t in config_context(self.config) if t[1].strip()), maxlen=scorer.context_turns)
        self._last_turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_turn.set_result(None)

    # -- the call -------------------------------------------------------------------------------------

    async def run(
        self, next_message: Callable[[], Awaitable[pb.StreamingRecognizeRequest | None]]
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        reader = asyncio.create_task(self._read(next_message))
        try:
            while (item := await self._out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                result = await item
                if result is not None:
                    yield pb.StreamingRecognizeResponse(result=result)
                self._unsent -= 1
                if item is self._interim:
                    self._interim = None
        finally:  # an error, a cancelled call or a finished one: nothing of this stream keeps running
            reader.cancel()
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *self._tasks, return_exceptions=True)

    async def _read(self, next_message: Callable[[], Awaitable[pb.StreamingRecognizeRequest | None]]) -> None:
        try:
            span = self.cfg.interim_span_s
            next_point = span
            while (request := await next_message()) is not None:
                await self._share()
                self.ticket.fits(self.stream.incoming_bytes(request))  # before any decoding
                fed = await self.scorer.off_loop(self.stream.feed, request)
                if fed.audio is not None:
                    self._close(await self._segment(fed.audio))
                elif fed.segment_transcript is not None:
                    self.transcripts.add(fed.segment_transcript)
                    self._arrival.set()
                    self._arrival = asyncio.Event()
                    if not self._undecided:
                        self.transcripts.prune(self._next_index, self._closed_end_s)
                    self._hold()
                seconds = self.segmenter.total_samples / SAMPLE_RATE
                if self.config.interim_results and seconds >= next_point:
                    self._start_interim()
                    next_point = next_interim(seconds, span)
            closed = await self._segment(await self.scorer.off_loop(self.stream.finish))
            closed += self.segmenter.finish()
            self._ended = True
            self._arrival.set()
            self._close(closed)
            self._out.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the response side, which raises it into the call's status
            self._out.put_nowait(exc)

    async def _segment(self, audio: np.ndarray) -> list[Segment]:
        """Decoded audio through the VAD (batched with the other streams') and the segmenter."""
        windows = self.segmenter.split(audio)
        return self.segmenter.advance(windows, await self.vad.score(self.segmenter.vad_state, windows))

    def _hold(self) -> None:
        self.ticket.hold_samples(self.segmenter.buffered_samples + self._closed_samples)

    async def _share(self) -> None:
        """Back-pressure: while this stream has its share of segments in work, its next message is
        not read (gRPC's fixed flow-control window then stops the client's sends), so a client
        sending faster than real time is paced to what the server computes for it, and never
        fills the ASR queue or the batcher for everyone."""
        while self._in_work >= self.cfg.max_stream_pending_segments:
            self._slot_free.clear()
            await self._slot_free.wait()

    def _close(self, segments: list[Segment]) -> None:
        """Each closed segment is scored at once (its task joins the ordered output)."""
        for seg in segments:
            self._next_index = seg.index + 1
            self._closed_end_s = seg.end_s
            self._closed_samples += len(seg.audio)
            self._undecided += 1
            before, self._last_turn = self._last_turn, asyncio.get_running_loop().create_future()
            self._spawn(self._final(seg, time.monotonic(), before, self._last_turn))
        self._hold()

    def _spawn(self, coro: Awaitable[pb.EmotionResult | None]) -> asyncio.Task[pb.EmotionResult | None]:
        # What waits for a client that does not read is bounded: past it the stream ends.
        if self._unsent >= MAX_UNSENT_RESULTS:
            raise ServerBusy(f"{self._unsent} results of this stream are waiting to be read: read the responses "
                             "as they come (the server stops holding them)")
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._unsent += 1
        self._out.put_nowait(task)
        return task

    def _failed(self, seg: Segment, exc: Exception) -> pb.EmotionResult:
        """A final result that says this one segment failed, with the status the call would have
        ended with; an INTERNAL failure's detail goes to the log under the request id it names."""
        request_id = uuid.uuid4().hex[:16]
        code, message = status_for(exc, request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.error("segment %d failed (request id %s): %s: %s", seg.index, request_id, type(exc).__name__, exc,
                      exc_info=exc)
        result = pb.EmotionResult(is_final=True, error=pb.SegmentError(code=code.value[0], message=message))
        return self._place(result, seg)

    # -- scoring -----------------------------------------------------------------------------------------

    async def _final(self, seg: Segment, closed_at: float, before: asyncio.Future[None],
                     turn: asyncio.Future[None]) -> pb.EmotionResult:
        try:
            return await self._final_result(seg, closed_at, before, turn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # this segment's failure, not the conversation's
            return self._failed(seg, exc)

    async def _final_result(self, seg: Segment, closed_at: float, before: asyncio.Future[None],
                            turn: asyncio.Future[None]) -> pb.EmotionResult:
        try:
            try:
                st = await self._client_transcript(seg)
            finally:
                self._undecided -= 1
                if not self._undecided:
                    self.transcripts.prune(self._next_index, self._closed_end_s)
            # Only now does the segment take a slot of the stream's share: while it waits for its
            # client transcript the reader must keep reading, or that transcript could never arrive.
            self._in_work += 1
            try:
                return await self._decided(seg, st, closed_at, before, turn)
            finally:
                self._in_work -= 1
                self._slot_free.set()
        finally:
            if not turn.done():  # failed before its turn was in: the next segment still waits for `before`
                before.add_done_callback(lambda _: turn.done() or turn.set_result(None))
            self._closed_samples -= len(seg.audio)
            with contextlib.suppress(Exception):  # shrinking never raises; the ticket may be closed
                self._hold()

    async def _decided(self, seg: Segment, st: pb.SegmentTranscript | None, closed_at: float,
                       before: asyncio.Future[None], turn: asyncio.Future[None]) -> pb.EmotionResult:
        """A segment whose client transcript is in (or not coming): transcribe if needed and score."""
        transcript, speaker = self._from_client(st)
        if not self.scorer.context_turns:
            return await self._score(seg, transcript, speaker, final=True, started=closed_at)
        # The model reads the earlier turns: decide this one's transcript (client's or ASR's),
        # wait for the turns before it to be decided, read them, then add this one.
        utterance = Utterance(audio=seg.audio, transcript=transcript, speaker=speaker or None)
        said = await self.scorer.transcripts.transcript_for(utterance, self.config.asr, deadline_of(self.context))
        await asyncio.shield(before)  # cancelling this segment must not cancel the one before
        utterance = dataclasses.replace(utterance, transcript=said.text, context=tuple(self._history))
        if said.text.strip():
            self._history.append((utterance.speaker, said.text))
        turn.set_result(None)
        result = await self.scorer.score(utterance, said, self.context, True, closed_at)
        return self._place(result, seg)

    async def _client_transcript(self, seg: Segment) -> pb.SegmentTranscript | None:
        """The segment's transcript: already here, or arriving within the bounded wait."""
        deadline = time.monotonic() + self.wait_s
        while (st := self.transcripts.find(seg.index, seg.start_s, seg.end_s, take=True)) is None:
            remaining = deadline - time.monotonic()
            if self._ended or remaining <= 0:
                return None
            arrival = self._arrival
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrival.wait(), remaining)
        return st

    def _from_client(self, st: pb.SegmentTranscript | None) -> tuple[str, str]:
        """(transcript, speaker) from the client's segment transcript, if any."""
        speaker = (st.speaker if st is not None else "") or self.config.speaker
        return (st.transcript if st is not None else ""), speaker

    def _start_interim(self) -> None:
        """An interim result on the open segment so far, unless one is still in flight or unsent."""
        if self._interim is not None:
            return
        seg = self.segmenter.open_segment()
        if seg is None or len(seg.audio) < self.cfg.min_audio_seconds * SAMPLE_RATE:
            return
        st = self.transcripts.find(seg.index, seg.start_s, seg.end_s, take=False)
        transcript, speaker = self._from_client(st)
        self._interim = self._spawn(self._interim_result(seg, transcript, speaker))

    async def _interim_result(self, seg: Segment, transcript: str, speaker: str) -> pb.EmotionResult | None:
        """Best effort: a failure (a full queue, a busy ASR) skips this interim point."""
        try:
            return await self._score(seg, transcript, speaker, final=False, started=time.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            request_id = uuid.uuid4().hex[:16]
            if status_for(exc, request_id)[0] == grpc.StatusCode.INTERNAL:
                log.error("interim of segment %d failed (request id %s)", seg.index, request_id, exc_info=exc)
            return None

    async def _score(self, seg: Segment, transcript: str, speaker: str, final: bool,
                     started: float) -> pb.EmotionResult:
        # The service picks the transcript the model reads: the client's, else ASR's (per
        # config.asr and the server's --asr), else none; the result says which.
        utterance = Utterance(audio=seg.audio, transcript=transcript, speaker=speaker or None,
                              context=tuple(self._history))
        result = await self.scorer.recognize_utterance(utterance, self.context, final, started, self.config.asr)
        return self._place(result, seg)

    @staticmethod
    def _place(result: pb.EmotionResult, seg: Segment) -> pb.EmotionResult:
        result.segment_index = seg.index
        result.start_s, result.end_s = seg.start_s, seg.end_s
        return result
