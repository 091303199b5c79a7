"""Turn an `EmotionClient` into the load generators' `call(request) -> CallResult`.

Unary calls go through `EmotionClient.recognize`. Streaming calls use `EmotionClient.open_stream`
and its request builder (`stream_messages`) with a pacing generator of their own, because latency must
start at the moment the *last* chunk is handed to gRPC — the instant a streaming user finishes
speaking — and only the generator that yields the chunks knows that moment.

A failed call is a result with its gRPC status name, not an exception: errors are measurements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import grpc

from benchmarks.loadgen import Call, CallResult
from benchmarks.workload import BenchRequest
from emoq_serve.client.api import EmotionClient, EmotionResult, stream_messages
from emoq_serve.config import SAMPLE_RATE

Api = Literal["unary", "stream", "conversation"]  # conversation: benchmarks.conversation
#: Wire format: 16-bit PCM, what microphones and telephony send (and half the bytes of float32).
ENCODING = "pcm16"
BYTES_PER_SAMPLE = 2


def _result(req: BenchRequest, sent: float, result: EmotionResult | None, code: str) -> CallResult:
    return CallResult(
        index=req.index, sent=sent, done=time.monotonic(), code=code,
        audio_seconds=result.audio_seconds if result else req.seconds,
        server_ms=dict(result.timings_ms) if result else {},
    )


def unary_call(client: EmotionClient, timeout_s: float) -> Call:
    async def call(req: BenchRequest) -> CallResult:
        sent = time.monotonic()
        try:
            result = await client.recognize(req.audio, SAMPLE_RATE, req.transcript, req.speaker,
                                            encoding=ENCODING, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            return _result(req, sent, None, e.code().name)
        return _result(req, sent, result, "OK")

    return call


def stream_call(client: EmotionClient, timeout_s: float, chunk_ms: float, realtime: bool) -> Call:
    async def call(req: BenchRequest) -> CallResult:
        sent = time.monotonic()  # replaced when the last chunk goes out

        async def paced(messages: Iterator) -> AsyncIterator:
            nonlocal sent
            for message in messages:
                if realtime and message.audio_content:
                    await asyncio.sleep(len(message.audio_content) / BYTES_PER_SAMPLE / SAMPLE_RATE)
                yield message
                sent = time.monotonic()

        messages = stream_messages(req.audio, SAMPLE_RATE, req.transcript, req.speaker,
                                   chunk_ms=chunk_ms, encoding=ENCODING)
        final = None
        try:
            async for response in client.open_stream(paced(messages), timeout=timeout_s):
                if response.result.is_final:
                    final = EmotionResult.from_proto(response.result)
        except grpc.aio.AioRpcError as e:
            return _result(req, sent, None, e.code().name)
        return _result(req, sent, final, "OK" if final else "NO_FINAL_RESULT")

    return call


def make_call(client: EmotionClient, api: Api, timeout_s: float, chunk_ms: float = 100.0,
              realtime: bool = False) -> Call:
    if api == "unary":
        return unary_call(client, timeout_s)
    if api == "stream":
        return stream_call(client, timeout_s, chunk_ms, realtime)
    raise ValueError(f"unknown api {api!r}; choose unary or stream")
