"""Request validation and decoding: from protobuf messages to a 16 kHz float32 `Utterance`.

A stream's state between its messages (config, decoded chunks, late transcript) is
`streams.StreamAssembler`, which checks each message with the `RequestValidator` here.

Everything a client can get wrong is caught here, before any queueing or compute, and raised as
`InvalidRequest` with a message that says what to change (the service maps it to
INVALID_ARGUMENT). Limits are checked from byte counts before decoding, so an oversized
stream is refused while it arrives instead of after it has been buffered whole.

Messages larger than `max_message_bytes` never get here: grpc's own receive limit answers them
with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from emoq_serve.audio import decode_float32, decode_pcm16, resample
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.executors.types import Turn, Utterance
from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.server.config import ServerConfig

#: Bytes per sample of each accepted encoding.
SAMPLE_BYTES = {pb.LINEAR16: 2, pb.FLOAT32: 4}
ENCODING_NAMES = {pb.LINEAR16: "LINEAR16", pb.FLOAT32: "FLOAT32"}

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


def config_context(config: pb.RecognitionConfig) -> tuple[Turn, ...]:
    """The request's earlier turns as the model takes them: (speaker or None, transcript)."""
    return tuple((t.speaker or None, t.transcript) for t in config.context)


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
        # Decoding runs on worker threads; a fast tokenizer must not be entered by two at once.
        self._token_lock = threading.Lock()

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
        if len(config.context) > self.cfg.max_context_turns:
            raise InvalidRequest(f"config.context has {len(config.context)} turns; the limit is "
                                 f"{self.cfg.max_context_turns}: send the latest ones")
        for turn in config.context:
            if len(turn.speaker) > self.cfg.max_speaker_chars:
                raise InvalidRequest(f"config.context speaker has {len(turn.speaker)} characters; "
                                     f"the limit is {self.cfg.max_speaker_chars}")
            self.check_transcript(turn.transcript)
        if config.segmentation not in (pb.UTTERANCE, pb.VOICE_ACTIVITY):
            raise InvalidRequest(f"config.segmentation {config.segmentation} is unknown: use UTTERANCE or VOICE_ACTIVITY")
        if config.segmentation == pb.UTTERANCE and (config.HasField("voice_activity") or config.segment_transcript_wait_ms):
            raise InvalidRequest("config.voice_activity and segment_transcript_wait_ms need segmentation VOICE_ACTIVITY: "
                                 "set it, or leave them unset")
        if config.segmentation == pb.VOICE_ACTIVITY and config.transcript:
            raise InvalidRequest("config.transcript is one utterance's text: in VOICE_ACTIVITY mode send "
                                 "segment_transcript messages (by segment index or time range)")
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
        if self.count_tokens is None or not text:
            return
        with self._token_lock:
            n = self.count_tokens(text)
        if n > self.cfg.max_transcript_tokens:
            raise InvalidRequest(f"transcript has {n} tokens; the limit is {self.cfg.max_transcript_tokens}: shorten it")

    def check_segment_transcript(self, st: pb.SegmentTranscript) -> None:
        target = st.WhichOneof("target")
        if target is None:
            raise InvalidRequest("segment_transcript has no target: set segment_index or time_range")
        if target == "segment_index" and st.segment_index < 0:
            raise InvalidRequest(f"segment_transcript.segment_index={st.segment_index}: segments are numbered from 0")
        if target == "time_range":
            a, b = st.time_range.start_s, st.time_range.end_s
            if not (np.isfinite(a) and np.isfinite(b) and 0 <= a < b):
                raise InvalidRequest(f"segment_transcript.time_range [{a}, {b}] is not a range of stream seconds: "
                                     "send 0 <= start_s < end_s")
        if len(st.speaker) > self.cfg.max_speaker_chars:
            raise InvalidRequest(f"segment_transcript.speaker has {len(st.speaker)} characters; "
                                 f"the limit is {self.cfg.max_speaker_chars}")
        self.check_transcript(st.transcript)

    def check_length(self, config: pb.RecognitionConfig, num_bytes: int) -> None:
        """Refuse audio longer than the limit, judged from its size alone."""
        seconds = num_bytes / SAMPLE_BYTES[config.encoding] / config.sample_rate_hz
        if seconds > self.cfg.max_audio_seconds:
            raise InvalidRequest(
                f"audio is longer than the {self.cfg.max_audio_seconds:g} s limit "
                f"({seconds:.1f} s received): split it into shorter requests"
            )

    def check_chunk_length(self, config: pb.RecognitionConfig, num_bytes: int) -> None:
        """VOICE_ACTIVITY: one chunk is at most one model input long, judged from its size alone
        (16 MB of 8 kHz LINEAR16 would otherwise decode to over 1,000 s of audio at once)."""
        seconds = num_bytes / SAMPLE_BYTES[config.encoding] / config.sample_rate_hz
        if seconds > self.cfg.max_audio_seconds:
            raise InvalidRequest(f"an audio chunk of {seconds:.1f} s is longer than the {self.cfg.max_audio_seconds:g} s "
                                 "limit: send the stream in shorter chunks (e.g. 100 ms each)")

    def decode_samples(self, config: pb.RecognitionConfig, data: bytes) -> np.ndarray:
        """Whole samples of wire bytes -> float32 at the client's rate, refusing NaN/Inf and
        out-of-range values. Runs on a worker thread, never on the event loop."""
        decode = decode_pcm16 if config.encoding == pb.LINEAR16 else decode_float32
        try:  # partial samples and NaN/Inf are refused by the decoders, with the reason
            audio = decode(data)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        # Finite but huge FLOAT32 values are not audio (often integer PCM sent as FLOAT32) and
        # overflow the model's activations into NaN posteriors.
        if audio.size and (peak := float(np.abs(audio).max())) > self.cfg.max_abs_sample:
            raise InvalidRequest(
                f"FLOAT32 audio peaks at {peak:.3g}; samples must lie in [-1, 1] (limit {self.cfg.max_abs_sample:g}): "
                "scale the audio, or send LINEAR16 if these are 16-bit integer samples"
            )
        return audio

    def check_min_length(self, config: pb.RecognitionConfig, num_samples: int) -> None:
        if (seconds := num_samples / config.sample_rate_hz) < self.cfg.min_audio_seconds:
            raise InvalidRequest(
                f"audio is {seconds * 1e3:.1f} ms long; the model needs at least {self.cfg.min_audio_seconds * 1e3:g} ms"
            )

    def decode(self, config: pb.RecognitionConfig, data: bytes) -> np.ndarray:
        """Checked audio bytes -> mono float32 at 16 kHz."""
        if not data:
            raise InvalidRequest("no audio: send audio_content with at least one sample")
        self.check_length(config, len(data))
        audio = self.decode_samples(config, data)
        self.check_min_length(config, len(audio))
        return np.ascontiguousarray(resample(audio, config.sample_rate_hz, SAMPLE_RATE), dtype=np.float32)

    def unary(self, request: pb.RecognizeRequest | MalformedMessage) -> Utterance:
        """A whole `RecognizeRequest` -> `Utterance`."""
        if isinstance(request, MalformedMessage):
            raise request.reject()
        if not request.HasField("config"):
            raise InvalidRequest("RecognizeRequest.config is missing: set encoding and sample_rate_hz")
        self.check_config(request.config)
        if request.config.segmentation == pb.VOICE_ACTIVITY:
            raise InvalidRequest("segmentation VOICE_ACTIVITY needs StreamingRecognize: Recognize scores one utterance")
        audio = self.decode(request.config, request.audio_content)
        return Utterance(audio=audio, transcript=request.config.transcript, speaker=request.config.speaker or None,
                         context=config_context(request.config))
