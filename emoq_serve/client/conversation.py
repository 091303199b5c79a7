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


# --- `emoq client FILE --conversation`: the emotion timeline of a whole recording ------------------------

_SOURCES = {pb.TRANSCRIPT_NONE: "none", pb.TRANSCRIPT_CLIENT: "client", pb.TRANSCRIPT_ASR: "asr"}


def texts_from_ground_truth(path: str) -> list[SegmentText]:
    """Transcripts of a generated conversation's json (`emoq_serve.data.conversation`), each sent
    by time range right after its turn's speech ends (as a live captioner would)."""
    import json

    return texts_from_turns(json.loads(open(path).read())["turns"])


def texts_from_turns(turns: Sequence[dict]) -> list[SegmentText]:
    """`texts_from_ground_truth` for turns already in memory (`Conversation.meta()["turns"]`)."""
    return [SegmentText(t["transcript"], start_s=t["start_s"], end_s=t["end_s"], speaker=t.get("speaker", ""),
                        after_s=t["end_s"]) for t in turns]


async def stream_conversation(client, audio: np.ndarray, sample_rate: int, texts: Sequence[SegmentText] = (), *,
                              chunk_ms: float = 100.0, realtime: bool = False, interim: bool = False,
                              transcript_wait_ms: int = 0, timeout: float | None = None):
    """Stream a recording in VOICE_ACTIVITY mode through an `EmotionClient`; yields
    (result, latency_ms): latency from sending the segment's last audio to receiving its result.

    `timeout` (default: the client's) bounds the wait after the audio: a real-time stream lasts as
    long as its recording, so its call deadline is the recording's length plus `timeout`."""
    import asyncio
    import time

    sent: list[tuple[float, float]] = []  # (stream seconds sent, monotonic time)
    messages = conversation_messages(audio, sample_rate, texts, chunk_ms=chunk_ms, interim=interim,
                                     transcript_wait_ms=transcript_wait_ms)

    async def paced():
        seconds = 0.0
        for m in messages:
            if m.audio_content:
                n = len(m.audio_content) / 4 / sample_rate
                if realtime:
                    await asyncio.sleep(n)
                seconds += n
                sent.append((seconds, time.monotonic()))
            yield m

    deadline = timeout or client.timeout
    if deadline is not None and realtime:
        deadline += len(audio) / sample_rate
    async for response in client.open_stream(paced(), timeout=deadline):
        r = response.result
        now = time.monotonic()
        at = next((t for s, t in sent if s >= r.end_s - 1e-6), now)
        yield r, (now - at) * 1e3


def result_row(path: str, r: pb.EmotionResult, latency_ms: float) -> dict:
    return {"file": path, "segment_index": r.segment_index, "is_final": r.is_final, "start_s": round(r.start_s, 3),
            "end_s": round(r.end_s, 3), "speaker": r.speaker, "transcript": r.transcript,
            "transcript_source": _SOURCES.get(r.transcript_source, str(r.transcript_source)), "label": r.label,
            "probability": round(max((s.probability for s in r.scores), default=0.0), 4),
            "probabilities": {s.label: s.probability for s in r.scores}, "latency_ms": round(latency_ms, 1),
            "server_ms": round(r.timing.total_ms, 1)}


def format_timeline(rows: list[dict]) -> str:
    """Aligned timeline: one line per segment (interims marked), in stream order."""
    header = ["seg", "start", "end", "speaker", "transcript", "label", "prob", "latency_ms"]
    body = [[f"{r['segment_index']}" + ("" if r["is_final"] else "~"), f"{r['start_s']:.2f}", f"{r['end_s']:.2f}",
             r["speaker"] or "-", (r["transcript"][:40] or f"({r['transcript_source']})"), r["label"],
             f"{r['probability']:.3f}", f"{r['latency_ms']:.0f}"] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body])


async def run_conversation(client, path: str, audio: np.ndarray, sample_rate: int, args) -> None:
    """`emoq client FILE --conversation`: print the timeline (or JSON lines with --json)."""
    import json

    texts = texts_from_ground_truth(args.segment_texts) if args.segment_texts else []
    rows = []
    async for r, latency in stream_conversation(client, audio, sample_rate, texts, chunk_ms=args.chunk_ms,
                                                realtime=args.realtime, interim=args.interim,
                                                transcript_wait_ms=2000 if texts else 0):
        rows.append(result_row(path, r, latency))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"{path}: {sum(r['is_final'] for r in rows)} segment(s)")
        if rows:
            print(format_timeline(rows))
