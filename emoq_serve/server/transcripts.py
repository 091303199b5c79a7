"""Which transcript the model reads for one utterance or segment: the client's, ASR's, or none.

`TranscriptStage.transcript_for` is called per utterance (unary, UTTERANCE streams) and, for
conversation streams, per segment; it runs before the batcher, ASR on its own worker thread, so
the event loop never waits on Whisper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.speech.asr import AsrEngine
from emoq_serve.executors.types import Utterance

#: `--asr` values as the per-request enum.
SERVER_MODES = {"off": pb.ASR_OFF, "auto": pb.ASR_AUTO, "always": pb.ASR_ALWAYS}


@dataclass(frozen=True)
class Transcript:
    text: str
    source: int  # pb.TranscriptSource
    asr_ms: float = 0.0  # queueing + recognition, when ASR produced it
    asr_run: pb.AsrRun | None = None  # its queue wait, compute time, beam, batch and window


class TranscriptStage:
    """The server's ASR setting and engine (None = served without ASR: `--asr off`).

    `count_tokens`/`max_tokens`: an ASR transcript longer than the model's text limit keeps its
    first words (a client's is refused by validation instead; ASR output cannot be sent back).
    """

    def __init__(self, asr: AsrEngine | None, server_mode: str, count_tokens: Callable[[str], int] | None = None,
                 max_tokens: int | None = None) -> None:
        self.asr = asr
        self.default = SERVER_MODES[server_mode] if asr is not None else pb.ASR_OFF
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens

    def mode(self, requested: int) -> int:
        """The request's mode, or the server's for ASR_SERVER_DEFAULT."""
        return self.default if requested == pb.ASR_SERVER_DEFAULT else requested

    async def transcript_for(self, utterance: Utterance, mode: int, deadline: float | None = None) -> Transcript:
        """The transcript to score `utterance` with under `mode` (a RecognitionConfig.asr value);
        ASR waits at most until `deadline` (time.monotonic())."""
        mode = self.mode(mode)
        client = utterance.transcript.strip()
        if mode == pb.ASR_ALWAYS or (mode == pb.ASR_AUTO and not client):
            if self.asr is None:  # validation refuses these requests first; never silently skipped
                raise RuntimeError("ASR requested on a server without an ASR engine")
            r = await self.asr.transcribe(utterance.audio, deadline)
            run = pb.AsrRun(queue_ms=r.queue_ms, compute_ms=r.compute_ms, beam_size=r.beam_size,
                            batch_size=r.batch_size, window_s=r.window_s)
            return Transcript(self._fit(r.text), pb.TRANSCRIPT_ASR, r.total_ms, run)
        if client:
            return Transcript(utterance.transcript, pb.TRANSCRIPT_CLIENT)
        return Transcript("", pb.TRANSCRIPT_NONE)

    def _fit(self, text: str) -> str:
        if self.count_tokens is None or self.max_tokens is None:
            return text
        words = text.split()
        while words and self.count_tokens(" ".join(words)) > self.max_tokens:
            words.pop()
        return " ".join(words)
