"""`EmotionClient` (asyncio) and the request builders for the gRPC API.

The demo, the benchmark and `emoq client` drive the server through this module, so request
building (encoding, chunking, the late-transcript convention) and the retry policy are written
once, here.

Retries: the channel carries a gRPC service-config retry policy (`retry_service_config`): a call
that ends UNAVAILABLE (engine restarting, server draining) or RESOURCE_EXHAUSTED (queue full) is
tried again after an exponential, jittered backoff, at most `retries` more times, all within the
call's one deadline. Every method is idempotent (scoring changes no server state), so all are
retried. gRPC retries a call only until it is committed: a stream is no longer retried once the
first response (e.g. an interim result) has arrived, or once more than the per-call retry buffer
(`grpc.per_rpc_retry_buffer_size`, 256 KiB by default: about 4 s of float32 audio at 16 kHz) has
been sent; those failures reach the caller. A channel-wide retry throttle stops retrying while
most calls fail, so an overloaded server is not hit harder. `retries=0` turns retries off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
import numpy as np

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve._proto import emoq_pb2_grpc as pb_grpc

Encoding = Literal["float32", "pcm16"]
_ENCODINGS = {"float32": pb.FLOAT32, "pcm16": pb.LINEAR16}
_TIMING_FIELDS = ("queue", "audio_encoder", "former", "pooling", "llm", "total")

#: What a retry may fix: the server is restarting its engine or draining, or its queue is full.
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
#: gRPC caps a retry policy at 5 attempts (more are silently cut to 5).
MAX_RETRIES = 4
DEFAULT_RETRIES = 3


def retry_service_config(retries: int, initial_backoff_s: float = 0.2, max_backoff_s: float = 5.0) -> str | None:
    """The gRPC service config (JSON) retrying every `emoq.v1.EmotionRecognizer` method on
    `RETRYABLE_CODES` up to `retries` more times; None for `retries=0`.

    Attempt n+1 waits a random time in [0, min(initial * 2**(n-1), max)] s (gRPC's jitter)."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(
            f"retries must be between 0 (off) and {MAX_RETRIES} (gRPC allows at most 5 attempts), got {retries}"
        )
    if initial_backoff_s <= 0 or max_backoff_s < initial_backoff_s:
        raise ValueError(f"need 0 < initial_backoff_s <= max_backoff_s, got {initial_backoff_s} and {max_backoff_s}")
    if retries == 0:
        return None
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": f"{initial_backoff_s:g}s",
        "maxBackoff": f"{max_backoff_s:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    return json.dumps({
        "methodConfig": [{"name": [{"service": pb.DESCRIPTOR.services_by_name["EmotionRecognizer"].full_name}],
                          "retryPolicy": policy}],
        # Retries pause while failures outweigh successes (token bucket of 10, +0.1 per success).
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    })


def channel_options(max_message_bytes: int, retries: int = DEFAULT_RETRIES,
                    retry_backoff_s: float = 0.2, load_balancing: str | None = None) -> list[tuple[str, int | str]]:
    """Channel options: message size limits, the retry policy (`retries=0`: none) and the
    load-balancing policy over the target's addresses (None: gRPC's default, pick_first)."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes),
    ]
    retry = retry_service_config(retries, retry_backoff_s)
    config = json.loads(retry) if retry is not None else {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    options.append(("grpc.enable_retries", int(retry is not None)))
    if config:
        options.append(("grpc.service_config", json.dumps(config)))
    return options


def channel_target(addresses: str | Sequence[str]) -> str:
    """A gRPC target: one address as given (`host:port`, `dns:///name:port`, `ipv4:a:p,b:p`, ...),
    or several front doors' `ip:port` addresses as one `ipv4:`/`ipv6:` target that a
    load-balancing policy spreads calls over. Host names need DNS (`dns:///name:port` with one
    record per front door), so a list must hold IP addresses."""
    if isinstance(addresses, str):
        return addresses
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            families.add(None)
        if not sep or not port.isdigit() or None in families:
            raise ValueError(f"several servers must be given as IP:PORT (got {address!r}); for host names "
                             "use one dns:///NAME:PORT target whose name resolves to every front door")
    if len(families) != 1:
        raise ValueError(f"mix of IPv4 and IPv6 addresses: {list(addresses)}")
    return f"ipv{families.pop()}:" + ",".join(addresses)


class _ServerStatusKept:
    """A grpc.aio streaming call's Core call object, keeping the server's status (grpcio 1.85,
    grpc/grpc#36066): a request written as the server ends the stream (an abort, a drain's
    cut-off) fails in Core, and grpcio then replaces the status the server sent with INTERNAL
    "Internal error from Core". Here that INTERNAL is set only if no status has come `grace_s`
    later (grpcio sets it because a batch Core refuses may never get one)."""

    def __init__(self, call: object, grace_s: float = 1.0) -> None:
        self._call, self._grace_s = call, grace_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._call, name)

    def __repr__(self) -> str:
        return repr(self._call)

    def set_internal_error(self, error: str) -> None:
        if self._call.done():
            return
        call = self._call
        asyncio.get_running_loop().call_later(self._grace_s, lambda: call.done() or call.set_internal_error(error))


@dataclass
class EmotionResult:
    """One server result: label, per-class probabilities (label order), timings per stage."""

    label: str
    probabilities: dict[str, float]
    is_final: bool
    audio_seconds: float
    timings_ms: dict[str, float]

    @classmethod
    def from_proto(cls, r: pb.EmotionResult) -> EmotionResult:
        return cls(
            label=r.label,
            probabilities={s.label: s.probability for s in r.scores},
            is_final=r.is_final,
            audio_seconds=r.audio_seconds,
            timings_ms={f: getattr(r.timing, f"{f}_ms") for f in _TIMING_FIELDS},
        )


def encode_audio(audio: np.ndarray, encoding: Encoding) -> bytes:
    """Mono float audio in [-1, 1] -> wire bytes (little-endian)."""
    audio = np.asarray(audio, dtype=np.float32)
    if encoding == "pcm16":
        return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    return audio.astype("<f4").tobytes()


def recognition_config(
    sample_rate: int, transcript: str = "", speaker: str | None = None, interim: bool = False,
    encoding: Encoding = "float32", context: Sequence[tuple[str | None, str]] = (),
) -> pb.RecognitionConfig:
    """`context`: earlier turns of the conversation, oldest first, as (speaker or None, transcript)."""
    return pb.RecognitionConfig(
        encoding=_ENCODINGS[encoding], sample_rate_hz=sample_rate, transcript=transcript,
        speaker=speaker or "", interim_results=interim,
        context=[pb.ContextTurn(speaker=who or "", transcript=text) for who, text in context],
    )


def recognize_request(
    audio: np.ndarray, sample_rate: int, transcript: str = "", speaker: str | None = None,
    encoding: Encoding = "float32", context: Sequence[tuple[str | None, str]] = (),
) -> pb.RecognizeRequest:
    return pb.RecognizeRequest(
        config=recognition_config(sample_rate, transcript, speaker, encoding=encoding, context=context),
        audio_content=encode_audio(audio, encoding),
    )


def stream_messages(
    audio: np.ndarray, sample_rate: int, transcript: str = "", speaker: str | None = None, *,
    chunk_ms: float = 100.0, interim: bool = False, late_transcript: bool = False, encoding: Encoding = "float32",
) -> Iterator[pb.StreamingRecognizeRequest]:
    """Config, then audio in `chunk_ms` chunks; with `late_transcript` the text comes last."""
    config = recognition_config(sample_rate, "" if late_transcript else transcript, speaker, interim, encoding)
    yield pb.StreamingRecognizeRequest(config=config)
    step = max(1, int(sample_rate * chunk_ms / 1e3))
    for start in range(0, len(audio), step):
        yield pb.StreamingRecognizeRequest(audio_content=encode_audio(audio[start : start + step], encoding))
    if late_transcript and transcript:
        yield pb.StreamingRecognizeRequest(transcript=transcript)


class EmotionClient:
    """Async client. `async with EmotionClient("host:port") as c: r = await c.recognize(x, 16000)`.

    `target` is one gRPC target, or a list of several front doors' `ip:port` addresses; with a
    list, calls go round-robin over the addresses that are up (`load_balancing="round_robin"`,
    also usable with a `dns:///name:port` target that resolves to several front doors). A front
    door that goes down is skipped; one that drains answers UNAVAILABLE, which is retried.

    `token` adds `authorization: Bearer <token>`; `root_cert` (PEM bytes) switches to TLS, and
    `client_cert`/`client_key` add a client certificate for mutual TLS. `retries` (0 = off, at
    most 4) retries UNAVAILABLE and RESOURCE_EXHAUSTED with backoff starting at `retry_backoff_s`
    (see the module docstring for what streams can retry); `timeout` bounds all attempts together.
    """

    def __init__(
        self, target: str | Sequence[str] = "127.0.0.1:50051", *, token: str | None = None,
        root_cert: bytes | None = None, client_cert: bytes | None = None, client_key: bytes | None = None,
        timeout: float | None = 60.0, max_message_bytes: int = 16 * 1024 * 1024, retries: int = DEFAULT_RETRIES,
        retry_backoff_s: float = 0.2, load_balancing: str | None = None,
    ) -> None:
        if load_balancing is None and not isinstance(target, str) and len(target) > 1:
            load_balancing = "round_robin"
        target = channel_target(target)
        options = channel_options(max_message_bytes, retries, retry_backoff_s, load_balancing)
        if root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_cert, private_key=client_key, certificate_chain=client_cert)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.EmotionRecognizerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    async def __aenter__(self) -> EmotionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def recognize(
        self, audio: np.ndarray, sample_rate: int = 16_000, transcript: str = "", speaker: str | None = None, *,
        encoding: Encoding = "float32", timeout: float | None = None, context: Sequence[tuple[str | None, str]] = (),
    ) -> EmotionResult:
        """`context`: earlier turns (speaker or None, transcript), oldest first, for a model that
        reads dialogue context (`model_info().context_turns` > 0)."""
        request = recognize_request(audio, sample_rate, transcript, speaker, encoding, context)
        response = await self.stub.Recognize(request, timeout=timeout or self.timeout, metadata=self.metadata)
        return EmotionResult.from_proto(response.result)

    async def stream(
        self, audio: np.ndarray, sample_rate: int = 16_000, transcript: str = "", speaker: str | None = None, *,
        chunk_ms: float = 100.0, realtime: bool = False, interim: bool = False, late_transcript: bool = False,
        encoding: Encoding = "float32", timeout: float | None = None,
    ) -> AsyncIterator[EmotionResult]:
        """Stream the audio; yields interim results (if asked) and the final one.

        `realtime` paces the chunks at the audio's own speed, like a microphone.
        """
        messages = stream_messages(
            audio, sample_rate, transcript, speaker, chunk_ms=chunk_ms, interim=interim,
            late_transcript=late_transcript, encoding=encoding,
        )

        async def paced() -> AsyncIterator[pb.StreamingRecognizeRequest]:
            for message in messages:
                if realtime and message.audio_content:
                    await asyncio.sleep(len(message.audio_content) / (4 if encoding == "float32" else 2) / sample_rate)
                yield message

        async for response in self.open_stream(paced(), timeout=timeout):
            yield EmotionResult.from_proto(response.result)

    def open_stream(
        self, requests: AsyncIterator[pb.StreamingRecognizeRequest], timeout: float | None = None,
    ) -> grpc.aio.StreamStreamCall:
        """A `StreamingRecognize` call writing `requests` (deadline `timeout`, else the client's); a
        status the server ends it with reaches the caller as sent, even when a request was being
        written at that moment (`_ServerStatusKept`)."""
        call = self.stub.StreamingRecognize(requests, timeout=timeout or self.timeout, metadata=self.metadata)
        if hasattr(call, "_cython_call"):  # grpcio's private name (pinned); set before the call's tasks first run
            call._cython_call = _ServerStatusKept(call._cython_call)
        return call

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)
