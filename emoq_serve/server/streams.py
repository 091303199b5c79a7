"""The state of one `StreamingRecognize` call between its messages: config first, audio chunks
decoded as they arrive (a sample split across chunks carried over, resampling incremental), a late
transcript. Every message is checked with the call's `RequestValidator` (`validation.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.audio import StreamResampler, partial_sample_error
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.executors.types import Utterance
from emoq_serve.server.validation import (
    ENCODING_NAMES,
    SAMPLE_BYTES,
    InvalidRequest,
    MalformedMessage,
    RequestValidator,
    config_context,
)


@dataclass(frozen=True)
class Fed:
    """What one message gives a VOICE_ACTIVITY stream's caller to route: an audio chunk's decoded
    16 kHz samples (possibly none) or a segment transcript. Both None for every other message."""

    audio: np.ndarray | None = None
    segment_transcript: pb.SegmentTranscript | None = None


NOTHING = Fed()


class ChunkDecoder:
    """One stream's audio bytes -> 16 kHz float32, chunk by chunk.

    A sample split across two chunks is carried to the next one, and resampling is incremental
    (`StreamResampler`), so the samples never depend on where the client cut its chunks: the
    concatenated output equals decoding the whole stream at once.
    """

    def __init__(self, validator: RequestValidator, config: pb.RecognitionConfig) -> None:
        self.validator, self.config = validator, config
        self._width = SAMPLE_BYTES[config.encoding]
        self._rest = b""
        self._resampler = StreamResampler(config.sample_rate_hz, SAMPLE_RATE)
        self.num_bytes = 0

    @property
    def input_samples(self) -> int:
        """Whole samples received (at the client's rate)."""
        return self.num_bytes // self._width

    def decode(self, data: bytes) -> np.ndarray:
        """The next chunk; returns the 16 kHz samples it completes (possibly none)."""
        self.num_bytes += len(data)
        if self._rest:
            data = self._rest + data
        whole = len(data) - len(data) % self._width
        self._rest = data[whole:]
        return self._resampler(self.validator.decode_samples(self.config, data[:whole]))

    def flush(self) -> np.ndarray:
        """End of stream: the resampler's tail; refuses a trailing partial sample or no audio."""
        if self.num_bytes == 0:
            raise InvalidRequest("no audio: send audio_content with at least one sample")
        if self._rest:
            raise InvalidRequest(str(partial_sample_error(ENCODING_NAMES[self.config.encoding], self.num_bytes)))
        return self._resampler(np.zeros(0, np.float32), last=True)


class StreamAssembler:
    """The state of one `StreamingRecognize` call: config first, audio chunks, late transcript.

    Audio chunks are decoded as they arrive (`ChunkDecoder`; `feed` runs on a worker thread);
    in UTTERANCE mode the decoded samples are kept, so interim results see exactly the audio
    so far and the final result all of it. In VOICE_ACTIVITY mode `feed` hands each chunk's
    samples and each segment transcript back to the caller (the conversation loop), which holds
    only what its segments need.
    """

    def __init__(self, validator: RequestValidator) -> None:
        self.validator = validator
        self.config: pb.RecognitionConfig | None = None
        self.transcript = ""
        self._late_transcript = False
        self._decoder: ChunkDecoder | None = None
        self._audio: list[np.ndarray] = []
        self.held_samples = 0  # 16 kHz samples kept (UTTERANCE mode)

    def incoming_bytes(self, request: pb.StreamingRecognizeRequest) -> int:
        """Bytes of 16 kHz float32 audio `request`'s chunk will add once decoded (0 for any other
        message): what the stream's budget is asked for before the chunk is decoded."""
        if self.config is None or not request.audio_content or self.config.sample_rate_hz <= 0:
            return 0
        width = 2 if self.config.encoding == pb.LINEAR16 else 4
        return int(len(request.audio_content) / width * SAMPLE_RATE / self.config.sample_rate_hz) * 4

    @property
    def voice_activity(self) -> bool:
        return self.config is not None and self.config.segmentation == pb.VOICE_ACTIVITY

    @property
    def num_bytes(self) -> int:
        return 0 if self._decoder is None else self._decoder.num_bytes

    def feed(self, request: pb.StreamingRecognizeRequest | MalformedMessage) -> Fed:
        """Check and take one message; a VOICE_ACTIVITY stream's audio and segment transcripts
        come back for the caller to route (`Fed`), everything else is kept here."""
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
            self._decoder = ChunkDecoder(self.validator, request.config)
            return NOTHING
        if kind == "transcript":
            if self.voice_activity:
                raise InvalidRequest("a stream transcript needs UTTERANCE mode: in VOICE_ACTIVITY mode send "
                                     "segment_transcript messages (by segment index or time range)")
            if self.transcript or self._late_transcript:
                raise InvalidRequest("transcript given twice: send it in the config or in one late message, not both")
            self.validator.check_transcript(request.transcript)
            self.transcript = request.transcript
            self._late_transcript = True
            return NOTHING
        if kind == "segment_transcript":
            if not self.voice_activity:
                raise InvalidRequest("segment_transcript needs segmentation VOICE_ACTIVITY: in UTTERANCE mode send "
                                     "the transcript in the config or as one late transcript message")
            self.validator.check_segment_transcript(request.segment_transcript)
            return Fed(segment_transcript=request.segment_transcript)
        assert self._decoder is not None
        if self.voice_activity:  # no stream length limit: the segmenter bounds what is held
            self.validator.check_chunk_length(self.config, len(request.audio_content))
            return Fed(audio=self._decoder.decode(request.audio_content))
        self.validator.check_length(self.config, self.num_bytes + len(request.audio_content))
        audio = self._decoder.decode(request.audio_content)
        if audio.size:
            self._audio.append(audio)
            self.held_samples += len(audio)
        return NOTHING

    def finish(self) -> np.ndarray:
        """Half-close: the resampler's tail (and the checks that need the whole stream)."""
        if self.config is None or self._decoder is None:
            raise InvalidRequest("the stream ended before any config: send the RecognitionConfig first")
        tail = self._decoder.flush()
        self.validator.check_min_length(self.config, self._decoder.input_samples)
        return tail

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio received so far (at the client's rate)."""
        if self.config is None:
            return 0.0
        return self.num_bytes / SAMPLE_BYTES[self.config.encoding] / self.config.sample_rate_hz

    def utterance(self, final: bool) -> Utterance:
        """The audio so far (UTTERANCE mode); an interim view leaves out a trailing partial sample
        and the resampler's not yet determined tail."""
        if self.config is None:
            raise InvalidRequest("the stream ended before any config: send the RecognitionConfig first")
        if final:
            tail = self.finish()
            if tail.size:
                self._audio.append(tail)
                self.held_samples += len(tail)
        if len(self._audio) > 1:
            self._audio = [np.concatenate(self._audio)]
        audio = self._audio[0] if self._audio else np.zeros(0, np.float32)
        return Utterance(audio=audio, transcript=self.transcript, speaker=self.config.speaker or None,
                         context=config_context(self.config))
