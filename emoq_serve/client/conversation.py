"""Request building for VOICE_ACTIVITY streams (a whole conversation in one call).

Kept beside `emoq_serve.client.api` (whose single-utterance builders it reuses) so tests, the
CLI and benchmarks build conversation streams one way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.client.api import Encoding, encode_audio, recognition_config


@dataclass(frozen=True)
class SegmentText:
    """A client transcript for one segment: by `index`, or by `start_s`/`end_s` (stream seconds).
    `after_s`: send it once this much audio has been sent (0 = before any audio)."""

    transcript: str
    index: int | None = None
    start_s: float | None = None
    end_s: float | None = None
    speaker: str = ""
    after_s: float = 0.0

    def message(self) -> pb.StreamingRecognizeRequest:
        if self.index is not None:
            st = pb.SegmentTranscript(segment_index=self.index, transcript=self.transcript, speaker=self.speaker)
        else:
            st = pb.SegmentTranscript(time_range=pb.TimeRange(start_s=self.start_s, end_s=self.end_s),
                                      transcript=self.transcript, speaker=self.speaker)
        return pb.StreamingRecognizeRequest(segment_transcript=st)


def conversation_config(
    sample_rate: int, *, interim: bool = False, encoding: Encoding = "float32", speaker: str | None = None,
    transcript_wait_ms: int = 0, voice_activity: pb.VoiceActivityConfig | None = None,
) -> pb.RecognitionConfig:
    config = recognition_config(sample_rate, "", speaker, interim, encoding)
    config.segmentation = pb.VOICE_ACTIVITY
    config.segment_transcript_wait_ms = transcript_wait_ms
    if voice_activity is not None:
        config.voice_activity.CopyFrom(voice_activity)
    return config


def conversation_messages(
    audio: np.ndarray, sample_rate: int, texts: Sequence[SegmentText] = (), *, chunk_ms: float = 100.0,
    encoding: Encoding = "float32", **config: object,
) -> Iterator[pb.StreamingRecognizeRequest]:
    """Config, then audio in `chunk_ms` chunks with each segment transcript slotted in at its
    `after_s`; transcripts due after the last chunk come before the half-close."""
    yield pb.StreamingRecognizeRequest(config=conversation_config(sample_rate, encoding=encoding, **config))
    queue = sorted(texts, key=lambda t: t.after_s)
    step = max(1, int(sample_rate * chunk_ms / 1e3))
    k = 0
    for start in range(0, len(audio), step):
        while k < len(queue) and queue[k].after_s * sample_rate <= start:
            yield queue[k].message()
            k += 1
        yield pb.StreamingRecognizeRequest(audio_content=encode_audio(audio[start:start + step], encoding))
    for t in queue[k:]:
        yield t.message()
