"""The `emoq.v1.EmotionRecognizer` servicer (grpc.aio): validate, batch, answer.

Every call goes through one outcome guard that maps failures to gRPC statuses with a message
(the table is `server/status.py`) and counts them by status, so the error contract lives in one
place. Calls still running when the drain timeout ends are cut off with UNAVAILABLE and a
message, so no accepted call ends without a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve._proto import emoq_pb2_grpc as pb_grpc
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.engine.batcher import DynamicBatcher
from emoq_serve.executors.types import Recognizer
from emoq_serve.speech.vad import SileroVad, VadBatcher
from emoq_serve.server.config import ServerConfig
from emoq_serve.server.conversation import ConversationStream
from emoq_serve.server.limits import CallLimits, StreamTicket
from emoq_serve.server.scoring import Scorer, next_interim
from emoq_serve.server.status import REQUEST_ID_KEY, ShuttingDown, StreamIdle, status_for, withheld
from emoq_serve.server.telemetry import ServerMetrics
from emoq_serve.server.transcripts import TranscriptStage
from emoq_serve.server.streams import StreamAssembler
from emoq_serve.server.validation import RequestValidator

log = logging.getLogger(__name__)
T = TypeVar("T")


class EmotionRecognizerService(pb_grpc.EmotionRecognizerServicer):
    def __init__(
        self,
        recognizer: Recognizer,
        batcher: DynamicBatcher,
        validator: RequestValidator,
        metrics: ServerMetrics,
        cfg: ServerConfig,
        transcripts: TranscriptStage | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.scorer = Scorer(recognizer, batcher, metrics, cfg, transcripts)
        self.batcher = batcher
        self.validator = validator
        self.metrics = metrics
        self.cfg = cfg
        self.draining = False
        self._cut_off = False
        self._drain_timeout = 0.0
        self._tasks: set[asyncio.Task[object]] = set()
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.limits = CallLimits(cfg.max_streams, cfg.max_buffered_audio_s, cfg.max_stream_audio_s, cfg.max_unary_calls)
        #: Count unary calls per bearer token (the app sets it when tokens are on; a client could
        #: otherwise dodge the server-wide cap with made-up tokens).
        self.per_token = False
        metrics.open_streams.set_function(lambda: self.limits.open_streams)
        metrics.buffered_audio.set_function(lambda: self.limits.buffered_seconds)
        self._vad: VadBatcher | None = None
        self._vad_lock = asyncio.Lock()

    def speech_healthy(self) -> bool:
        """Neither the ASR worker nor the shared VAD thread is hung or gone."""
        asr = self.scorer.transcripts.asr
        return (asr is None or asr.healthy) and (self._vad is None or self._vad.healthy())

    async def vad(self) -> VadBatcher:
        """The Silero VAD all VOICE_ACTIVITY streams share (their steps batched), loaded on first use
        (off the loop)."""
        async with self._vad_lock:
            if self._vad is None:
                self._vad = VadBatcher(await self.scorer.off_loop(SileroVad), on_batch=self.metrics.vad_batch_size.observe)
        return self._vad

    def close(self) -> None:
        self.scorer.close()
        if self._vad is not None:
            self._vad.close()

    async def drain(self, timeout: float) -> int:
        """Refuse new calls, wait up to `timeout` s for accepted ones, then cut the rest off
        with UNAVAILABLE. Returns how many were cut off."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        left = self._calls
        if left:
            self._cut_off = True
            self._drain_timeout = timeout
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        return left

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Count the call by final status; turn exceptions into aborts with a message."""
        task = asyncio.current_task()
        assert task is not None
        self.metrics.inflight.inc()
        self._calls += 1
        self._tasks.add(task)
        self._idle.clear()
        try:
            if self.draining:
                raise ShuttingDown("the server is shutting down: retry on another instance")
            yield
        except asyncio.CancelledError:  # client cancelled or its deadline passed, or the drain ended
            if not self._cut_off:
                self.metrics.requests.labels(method, "CANCELLED").inc()
                raise
            self.metrics.requests.labels(method, "UNAVAILABLE").inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server shut down before this call finished (drain timeout {self._drain_timeout:g} s): retry",
            )
        except Exception as exc:
            request_id = uuid.uuid4().hex[:16]
            code, message = status_for(exc, request_id)
            trailing: tuple[tuple[str, str], ...] = ()
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed (request id %s): %s: %s", method, request_id, type(exc).__name__, exc,
                          exc_info=exc)
            if withheld(code, exc):  # the message names the id; the detail is in the log
                trailing = ((REQUEST_ID_KEY, request_id),)
            self.metrics.requests.labels(method, code.name).inc()
            await context.abort(code, message, trailing_metadata=trailing)
        else:
            self.metrics.requests.labels(method, "OK").inc()
        finally:
            self.metrics.inflight.dec()
            self._tasks.discard(task)
            self._calls -= 1
            if self._calls == 0:
                self._idle.set()

    async def Recognize(self, request: pb.RecognizeRequest, context: grpc.aio.ServicerContext) -> pb.RecognizeResponse:
        started = time.monotonic()
        async with self._outcome("Recognize", context):
            with self.limits.unary(self._token(context)):
                utterance = await self.scorer.off_loop(self.validator.unary, request)
                result = await self.scorer.recognize_utterance(utterance, context, True, started, request.config.asr)
                return pb.RecognizeResponse(result=result)

    def _token(self, context: grpc.aio.ServicerContext) -> str:
        if not self.per_token:
            return ""
        return next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")

    async def _next_message(
        self, requests: AsyncIterator[pb.StreamingRecognizeRequest]
    ) -> pb.StreamingRecognizeRequest | None:
        """The stream's next message, None after half-close; StreamIdle past the idle timeout."""
        try:
            return await asyncio.wait_for(anext(requests), self.cfg.stream_idle_timeout_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise StreamIdle(
                f"no stream message for {self.cfg.stream_idle_timeout_s:g} s: send audio or half-close"
            ) from None

    async def StreamingRecognize(
        self, request_iterator: AsyncIterator[pb.StreamingRecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        """UTTERANCE: config, audio chunks, optional late transcript; interim results per span;
        final on half-close. VOICE_ACTIVITY: a result per speech segment (ConversationStream)."""
        async with self._outcome("StreamingRecognize", context):
            ticket = self.limits.open()
            try:
                stream = StreamAssembler(self.validator)
                requests = aiter(request_iterator)
                first = await self._next_message(requests)
                if first is not None:
                    await self.scorer.off_loop(stream.feed, first)
                if stream.voice_activity:
                    conversation = ConversationStream(self.scorer, stream, context, ticket, await self.vad())
                    async for response in conversation.run(lambda: self._next_message(requests)):
                        yield response
                else:
                    async for response in self._utterance_stream(stream, requests, context, ticket, first is None):
                        yield response
            finally:
                ticket.close()

    async def _utterance_stream(
        self, stream: StreamAssembler, requests: AsyncIterator[pb.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext, ticket: StreamTicket, ended: bool,
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        """UTTERANCE mode after the first message: the whole stream is one utterance."""
        span = self.cfg.interim_span_s
        next_point = span
        while not ended and (request := await self._next_message(requests)) is not None:
            ticket.fits(stream.incoming_bytes(request))  # before any decoding
            await self.scorer.off_loop(stream.feed, request)
            ticket.hold_samples(stream.held_samples)
            if stream.config.interim_results and stream.audio_seconds >= next_point:
                # Computed inline: grpc buffers the chunks that arrive meanwhile (see next_interim).
                started = time.monotonic()
                utterance = await self.scorer.off_loop(stream.utterance, False)
                # Interims never run ASR: a text-only model without the client's transcript yet
                # skips them instead of ending the stream; the final gets ASR or the clear error.
                has_text = not self.scorer.text_only or bool((utterance.transcript or "").strip())
                if has_text and len(utterance.audio) >= self.cfg.min_audio_seconds * SAMPLE_RATE:
                    result = await self.scorer.recognize_utterance(utterance, context, False, started,
                                                             stream.config.asr)
                    yield pb.StreamingRecognizeResponse(result=result)
                next_point = next_interim(stream.audio_seconds, span)
        started = time.monotonic()
        utterance = await self.scorer.off_loop(stream.utterance, True)
        result = await self.scorer.recognize_utterance(utterance, context, True, started, stream.config.asr)
        yield pb.StreamingRecognizeResponse(result=result)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        async with self._outcome("GetModelInfo", context):
            info = dict(self.recognizer.info())
            for own_field in ("context_turns", "modality"):
                info.pop(own_field, None)
            asr = self.scorer.transcripts.asr
            return pb.GetModelInfoResponse(
                labels=list(self.recognizer.labels),
                sample_rate_hz=SAMPLE_RATE,
                bundle_id=info.pop("bundle_id", ""),
                preset=info.pop("preset", ""),
                context_turns=self.scorer.context_turns,
                modality=pb.MODALITY_TEXT_ONLY if self.scorer.text_only else pb.MODALITY_AUDIO_AND_TEXT,
                versions=info,
                asr=pb.AsrModelInfo(**asr.info()) if asr is not None else None,
            )
