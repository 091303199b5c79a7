"""Request validation and decoding: from protobuf messages to a 16 kHz float32 `Utterance`.

Everything a client can get wrong is caught here, before any queueing or compute, and raised as
`InvalidRequest` with a message that says what to change (the service maps it to
INVALID_ARGUMENT). Limits are checked from byte counts before decoding, so an oversized
stream is refused while it arrives instead of after it has been buffered whole.

Messages larger than `max_message_bytes` never get here: grpc's own receive limit answers them
with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from emoq_serve.audio import decode_float32, decode_pcm16, resample
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.runtime.types import Utterance
from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.server.config import ServerConfig

#: Bytes per sample of each accepted encoding.
SAMPLE_BYTES = {pb.LINEAR16: 2, pb.FLOAT32: 4}

M = TypeVar("M", bound=Message)


class InvalidRequest(ValueError):
    """The request cannot be served as sent (INVALID_ARGUMENT); the message says why."""


@dataclass
class MalformedMessage:
    """Request bytes that do not parse as the expected message.

    The server's deserializers return this instead of raising, so unparseable bytes get
    INVALID_ARGUMENT from the service like any other bad input (a raising deserializer makes
    grpc answer UNKNOWN/INTERNAL and log a stack trace per garbage message).
    """

    type_name: str
    error: str

    def reject(self) -> InvalidRequest:
        return InvalidRequest(f"malformed {self.type_name}: {self.error}; send a valid serialized message")


def tolerant_parser(message_type: type[M]) -> Callable[[bytes], M | MalformedMessage]:
    """A grpc request deserializer for `message_type` that never raises."""

    def parse(data: bytes) -> M | MalformedMessage:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return MalformedMessage(message_type.DESCRIPTOR.name, str(exc))

    return parse


class RequestValidator:
    """Checks configs, transcripts and audio against the server's limits.

    `count_tokens` measures transcripts with the bundle's transcript tokenizer; without one,
    only the character limit applies. Without `asr_available`, requests asking for ASR are refused.
    """

    def __init__(
        self, cfg: ServerConfig, count_tokens: Callable[[str], int] | None = None, asr_available: bool = False
    ) -> None:
        self.cfg = cfg
        self.count_tokens = count_tokens
        self.asr_available = asr_available  # whether ASR_AUTO/ASR_ALWAYS can be served

    def check_config(self, config: pb.RecognitionConfig) -> None:
        if config.encoding == pb.ENCODING_UNSPECIFIED:
            raise InvalidRequest("config.encoding is unspecified: set LINEAR16 (16-bit PCM) or FLOAT32")
        if config.encoding not in SAMPLE_BYTES:
            raise InvalidRequest(f"config.encoding {config.encoding} is unknown: use LINEAR16 or FLOAT32")
        lo, hi = self.cfg.min_sample_rate_hz, self.cfg.max_sample_rate_hz
        if not lo <= config.sample_rate_hz <= hi:
            raise InvalidRequest(
                f"config.sample_rate_hz={config.sample_rate_hz} is out of range: send audio at {lo}..{hi} Hz"
            )
        if len(config.speaker) > self.cfg.max_speaker_chars:
            raise InvalidRequest(f"config.speaker has {len(config.speaker)} characters; the limit is {self.cfg.max_speaker_chars}")
        self.check_transcript(config.transcript)
        # API fields of features still being built (conversation streaming): refused, never ignored.
        if config.segmentation != pb.UTTERANCE:
            raise InvalidRequest("segmentation VOICE_ACTIVITY is not served yet: send one utterance per stream (UTTERANCE)")
        if config.asr not in pb.AsrMode.values():
            raise InvalidRequest(f"config.asr {config.asr} is unknown: use ASR_SERVER_DEFAULT, ASR_OFF, ASR_AUTO or ASR_ALWAYS")
        if config.asr in (pb.ASR_AUTO, pb.ASR_ALWAYS) and not self.asr_available:
            raise InvalidRequest("config.asr asks for speech recognition, but this server runs without it (--asr off): "
                                 "send the transcript, or leave config.asr unset")

    def check_transcript(self, text: str) -> None:
        if len(text) > self.cfg.max_transcript_chars:
            raise InvalidRequest(
                f"transcript has {len(text)} characters; the limit is {self.cfg.max_transcript_chars}: shorten it"
            )
        if self.count_tokens is not None and (n := self.count_tokens(text)) > self.cfg.max_transcript_tokens:
            raise InvalidRequest(f"transcript has {n} tokens; the limit is {self.cfg.max_transcript_tokens}: shorten it")

    def check_length(self, config: pb.RecognitionConfig, num_bytes: int) -> None:
        """Refuse audio longer than the limit, judged from its size alone."""
        seconds = num_bytes / SAMPLE_BYTES[config.encoding] / config.sample_rate_hz
        if seconds > self.cfg.max_audio_seconds:
            raise InvalidRequest(
                f"audio is longer than the {self.cfg.max_audio_seconds:g} s limit "
                f"({seconds:.1f} s received): split it into shorter requests"
            )

    def decode(self, config: pb.RecognitionConfig, data: bytes) -> np.ndarray:
        """Checked audio bytes -> mono float32 at 16 kHz."""
        if not data:
            raise InvalidRequest("no audio: send audio_content with at least one sample")
        self.check_length(config, len(data))
        decode = decode_pcm16 if config.encoding == pb.LINEAR16 else decode_float32
        try:  # partial samples and NaN/Inf are refused by the decoders, with the reason
            audio = decode(data)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        # Finite but huge FLOAT32 values are not audio (often integer PCM sent as FLOAT32) and
        # overflow the model's activations into NaN posteriors.
        if (peak := float(np.abs(audio).max())) > self.cfg.max_abs_sample:
            raise InvalidRequest(
                f"FLOAT32 audio peaks at {peak:.3g}; samples must lie in [-1, 1] (limit {self.cfg.max_abs_sample:g}): "
                "scale the audio, or send LINEAR16 if these are 16-bit integer samples"
            )
        if (seconds := len(audio) / config.sample_rate_hz) < self.cfg.min_audio_seconds:
            raise InvalidRequest(
                f"audio is {seconds * 1e3:.1f} ms long; the model needs at least {self.cfg.min_audio_seconds * 1e3:g} ms"
            )
        return np.ascontiguousarray(resample(audio, config.sample_rate_hz, SAMPLE_RATE), dtype=np.float32)

    def unary(self, request: pb.RecognizeRequest | MalformedMessage) -> Utterance:
        """A whole `RecognizeRequest` -> `Utterance`."""
        if isinstance(request, MalformedMessage):
            raise request.reject()
        if not request.HasField("config"):
            raise InvalidRequest("RecognizeRequest.config is missing: set encoding and sample_rate_hz")
        self.check_config(request.config)
        audio = self.decode(request.config, request.audio_content)
        return Utterance(audio=audio, transcript=request.config.transcript, speaker=request.config.speaker or None)

    def stream(self) -> StreamAssembler:
        return StreamAssembler(self)


class StreamAssembler:
    """The state of one `StreamingRecognize` call: config first, audio chunks, late transcript.

    Audio is kept as received bytes and decoded when a result is due, so interim results see
    exactly the audio so far and the final result sees all of it.
    """

    def __init__(self, validator: RequestValidator) -> None:
        self.validator = validator
        self.config: pb.RecognitionConfig | None = None
        self.transcript = ""
        self._late_transcript = False
        self._chunks: list[bytes] = []
        self.num_bytes = 0

    def feed(self, request: pb.StreamingRecognizeRequest | MalformedMessage) -> None:
        if isinstance(request, MalformedMessage):
            raise request.reject()
        kind = request.WhichOneof("streaming_request")
        if kind is None:
            raise InvalidRequest("empty StreamingRecognizeRequest: set config, audio_content or transcript")
        if self.config is None and kind != "config":
            raise InvalidRequest(f"the first message must carry config, got {kind}: send the RecognitionConfig first")
        if kind == "config":
            if self.config is not None:
                raise InvalidRequest("config sent twice: send it once, as the first message")
            self.validator.check_config(request.config)
            self.config = request.config
            self.transcript = request.config.transcript
        elif kind == "transcript":
            if self.transcript or self._late_transcript:
                raise InvalidRequest("transcript given twice: send it in the config or in one late message, not both")
            self.validator.check_transcript(request.transcript)
            self.transcript = request.transcript
            self._late_transcript = True
        elif kind == "segment_transcript":
            raise InvalidRequest("segment_transcript needs segmentation VOICE_ACTIVITY, which this server does not serve yet")
        else:
            self.validator.check_length(self.config, self.num_bytes + len(request.audio_content))
            self._chunks.append(request.audio_content)
            self.num_bytes += len(request.audio_content)

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio received so far (at the client's rate)."""
        if self.config is None:
            return 0.0
        return self.num_bytes / SAMPLE_BYTES[self.config.encoding] / self.config.sample_rate_hz

    def utterance(self, final: bool) -> Utterance:
        """The audio so far; an interim view ignores a trailing partial sample."""
        if self.config is None:
            raise InvalidRequest("the stream ended before any config: send the RecognitionConfig first")
        data = b"".join(self._chunks)
        self._chunks = [data]
        if not final:
            data = data[: len(data) - len(data) % SAMPLE_BYTES[self.config.encoding]]
        audio = self.validator.decode(self.config, data)
        return Utterance(audio=audio, transcript=self.transcript, speaker=self.config.speaker or None)
