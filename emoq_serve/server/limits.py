"""Server-wide bounds on streams: how many are open at once and how much audio they hold.

Each `StreamingRecognize` call opens a `StreamTicket` and reports the 16 kHz samples it holds
after every chunk (UTTERANCE mode: the utterance so far; VOICE_ACTIVITY mode: the open segment
plus closed segments still waiting for their result). A stream over either limit is refused
with `ServerBusy` (RESOURCE_EXHAUSTED) and a message naming the limit, and what it held is
released, so one greedy client cannot take the memory every other stream needs. Everything
runs on the event loop (single-threaded), so no locks.
"""

from __future__ import annotations

from emoq_serve.config import SAMPLE_RATE


class ServerBusy(Exception):
    """A server-wide limit is reached (RESOURCE_EXHAUSTED); the message names it."""


class StreamLimits:
    def __init__(self, max_streams: int, max_buffered_audio_s: float) -> None:
        if max_streams < 1 or max_buffered_audio_s <= 0:
            raise ValueError(f"max_streams must be >= 1 and max_buffered_audio_s > 0; "
                             f"got {max_streams}, {max_buffered_audio_s}")
        self.max_streams = max_streams
        self.max_samples = int(max_buffered_audio_s * SAMPLE_RATE)
        self.open_streams = 0
        self.held_samples = 0

    @property
    def buffered_seconds(self) -> float:
        return self.held_samples / SAMPLE_RATE

    def open(self) -> StreamTicket:
        if self.open_streams >= self.max_streams:
            raise ServerBusy(f"the server's limit of {self.max_streams} concurrent streams (max_streams) is reached: "
                             "retry later or on another instance")
        self.open_streams += 1
        return StreamTicket(self)


class StreamTicket:
    """One open stream's share of the limits; `close()` (idempotent) gives it back."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self.samples = 0
        self.closed = False

    def hold(self, samples: int) -> None:
        """This stream now holds `samples`; refused when growing past the server's budget."""
        limits = self.limits
        if samples > self.samples and limits.held_samples - self.samples + samples > limits.max_samples:
            raise ServerBusy(
                f"the server's limit of {limits.max_samples / SAMPLE_RATE:g} s of buffered audio over all streams "
                f"(max_buffered_audio_s) is reached: send shorter utterances, use VOICE_ACTIVITY segmentation, "
                "or retry later"
            )
        limits.held_samples += samples - self.samples
        self.samples = samples

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.limits.held_samples -= self.samples
            self.samples = 0
            self.limits.open_streams -= 1
