"""Server-wide bounds on calls: open streams, unary calls in progress, and the audio bytes held.

Each `StreamingRecognize` call opens a `StreamTicket` and reports the bytes of 16 kHz float32
audio it holds after every chunk (UTTERANCE mode: the utterance so far; VOICE_ACTIVITY mode: the
open segment plus closed segments still waiting for their result), and asks `fits` *before* it
decodes a chunk or starts a segment's work. A stream is held to its own share
(`max_stream_bytes`) beside the server-wide budget, so one client sending faster than real time
cannot take the memory every other stream needs. Unary calls are counted server-wide, or per
bearer token when tokens are on, so one flooding client is refused at the door. Refusals are
`ServerBusy` (RESOURCE_EXHAUSTED) with a message naming the limit. Everything runs on the event
loop (single-threaded), so no locks.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from emoq_serve.config import SAMPLE_RATE

#: Bytes one second of held audio takes: 16 kHz mono float32.
BYTES_PER_SECOND = SAMPLE_RATE * 4


class ServerBusy(Exception):
    """A server limit is reached (RESOURCE_EXHAUSTED); the message names it."""


class CallLimits:
    def __init__(self, max_streams: int, max_buffered_audio_s: float, max_stream_audio_s: float,
                 max_unary_calls: int) -> None:
        if max_streams < 1 or max_unary_calls < 1 or max_buffered_audio_s <= 0 or max_stream_audio_s <= 0:
            raise ValueError("max_streams and max_unary_calls must be >= 1, max_buffered_audio_s and "
                             f"max_stream_audio_s > 0; got {max_streams}, {max_unary_calls}, "
                             f"{max_buffered_audio_s}, {max_stream_audio_s}")
        self.max_streams, self.max_unary_calls = max_streams, max_unary_calls
        self.max_bytes = int(max_buffered_audio_s * BYTES_PER_SECOND)
        self.max_stream_bytes = int(min(max_stream_audio_s, max_buffered_audio_s) * BYTES_PER_SECOND)
        self.open_streams = 0
        self.held_bytes = 0
        self.unary_calls: collections.Counter[str] = collections.Counter()

    @property
    def buffered_seconds(self) -> float:
        return self.held_bytes / BYTES_PER_SECOND

    def open(self) -> StreamTicket:
        if self.open_streams >= self.max_streams:
            raise ServerBusy(f"the server's limit of {self.max_streams} concurrent streams (--max-streams) is reached: "
                             "retry later or on another instance")
        self.open_streams += 1
        return StreamTicket(self)

    @contextlib.contextmanager
    def unary(self, key: str = "") -> Iterator[None]:
        """One unary call in progress for `key` (a bearer token, or "" for everybody)."""
        if self.unary_calls[key] >= self.max_unary_calls:
            whose = "for this token" if key else "on this server"
            raise ServerBusy(f"{self.max_unary_calls} Recognize calls are already in progress {whose} "
                             "(--max-unary-calls): retry later, or stream long audio instead")
        self.unary_calls[key] += 1
        try:
            yield
        finally:
            self.unary_calls[key] -= 1
            if not self.unary_calls[key]:
                del self.unary_calls[key]


class StreamTicket:
    """One open stream's share of the limits; `close()` (idempotent) gives it back."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self.held = 0  # bytes
        self.closed = False

    def fits(self, extra_bytes: int) -> None:
        """Refuse (ServerBusy) work that would hold `extra_bytes` more than now, before it starts."""
        limits = self.limits
        if limits.held_bytes + extra_bytes > limits.max_bytes:
            raise ServerBusy(
                f"the server's limit of {limits.max_bytes / BYTES_PER_SECOND:g} s of buffered audio over all streams "
                "(--max-buffered-audio-s) is reached: send shorter utterances, use VOICE_ACTIVITY segmentation, "
                "or retry later"
            )
        if self.held + extra_bytes > limits.max_stream_bytes:
            raise ServerBusy(
                f"this stream would hold more than its share of {limits.max_stream_bytes / BYTES_PER_SECOND:g} s of "
                "audio (--max-stream-audio-s): send audio no faster than real time, or shorter utterances"
            )

    def hold(self, nbytes: int) -> None:
        """This stream now holds `nbytes`; refused when growing past its share or the server's budget."""
        if nbytes > self.held:
            self.fits(nbytes - self.held)
        self.limits.held_bytes += nbytes - self.held
        self.held = nbytes

    def hold_samples(self, samples: int) -> None:
        self.hold(samples * 4)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.limits.held_bytes -= self.held
            self.held = 0
            self.limits.open_streams -= 1
