"""`emoq bench --api conversation`: N concurrent conversation streams paced in real time.

Each stream sends one generated conversation (`emoq_serve.data.conversation`, its own seed, so
streams' turns do not line up) in VOICE_ACTIVITY mode. A segment's latency runs from the moment
the audio at the end of its turn's speech (ground truth, matched by overlap) had been sent to the
moment its final result arrives: what a live client waits after someone stops talking (it
includes the segmenter's minimum silence). The server's RSS is sampled while the streams run,
against its RSS just before, for the memory each stream costs.

A stream count is *sustained* when every turn got its result, no stream failed, the p95 latency
stays under a bound and latency does not trend upward over the conversation (least-squares slope
against stream time): an overloaded server falls behind real time by a fixed fraction, so its
latency grows linearly with the conversation's length and the slope exposes it before p95 does.

Segments the server transcribed itself (`--asr-transcripts`) also report what ASR cost them
(`EmotionResult.asr`: queue wait, model-call time, beam, batch) and the word error rate of the
transcript against the turn's words, which the generator knows, per voice.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.stats import latency_summary
from benchmarks.target import BYTES_PER_SAMPLE, ENCODING
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.conversation import Conversation, match_turn

@dataclass
class Segment:
    """One final result of a stream: where it is, the turn it matched and its latency."""

    stream: int
    start_s: float
    end_s: float
    turn: int | None  # index of the ground-truth turn it overlaps most, None for a false segment
    latency_s: float
    asr: AsrSegment | None = None  # set when the server's ASR made its transcript


@dataclass(frozen=True)
class AsrSegment:
    """What the server's ASR did for one segment, and the words it should have heard."""

    queue_ms: float
    compute_ms: float
    beam_size: int
    batch_size: int
    hypothesis: str
    reference: str | None  # the matched turn's words; None for a false segment
    voice: str | None


@dataclass
class StreamRun:
    segments: list[Segment]
    turns: int
    code: str  # gRPC status name of the stream, "OK" when it ended normally


async def stream_conversation(client, stream: int, conv: Conversation, *, chunk_ms: float, realtime: bool,
                              client_transcripts: bool, timeout_s: float) -> StreamRun:
    """Send one conversation (pcm16, `chunk_ms` chunks, paced at its own speed when `realtime`),
    with the generator's transcripts by time range right after each turn when asked."""
    import grpc

    from emoq_serve._proto import emoq_pb2 as pb
    from emoq_serve.client.conversation import conversation_messages, texts_from_turns

    texts = texts_from_turns(conv.meta()["turns"]) if client_transcripts else []
    sent: list[tuple[float, float]] = []  # (stream seconds sent so far, monotonic time)

    async def paced():
        seconds, start = 0.0, time.monotonic()
        for m in conversation_messages(conv.audio, SAMPLE_RATE, texts, chunk_ms=chunk_ms, encoding=ENCODING):
            if m.audio_content:
                seconds += len(m.audio_content) / BYTES_PER_SAMPLE / SAMPLE_RATE
                if realtime:  # against the stream's own clock, so sleep overshoots never add up
                    await asyncio.sleep(start + seconds - time.monotonic())
            yield m
            if m.audio_content:
                sent.append((seconds, time.monotonic()))

    def sent_at(stream_s: float) -> float:
        return next((t for s, t in sent if s >= stream_s - 1e-6), time.monotonic())

    segments: list[Segment] = []
    try:
        async for response in client.open_stream(paced(), timeout=timeout_s):
            r = response.result
            if not r.is_final:
                continue
            now = time.monotonic()
            turn = match_turn(conv.turns, r.start_s, r.end_s)
            end_of_speech = turn.end_s if turn is not None else r.end_s
            asr = None
            if r.transcript_source == pb.TRANSCRIPT_ASR:
                asr = AsrSegment(r.asr.queue_ms, r.asr.compute_ms, r.asr.beam_size, r.asr.batch_size, r.transcript,
                                 turn.transcript if turn else None, turn.voice if turn else None)
            segments.append(Segment(stream, r.start_s, r.end_s, turn.index if turn else None,
                                    now - sent_at(end_of_speech), asr))
    except grpc.aio.AioRpcError as e:
        return StreamRun(segments, len(conv.turns), e.code().name)
    return StreamRun(segments, len(conv.turns), "OK")


#: Seconds of the first conversation streamed (unpaced) before measuring.
WARMUP_SECONDS = 15.0


def head(conv: Conversation, seconds: float) -> Conversation:
    """The conversation's first `seconds` with the turns that end inside them."""
    keep = conv.audio[:round(seconds * conv.sample_rate)]
    return dataclasses.replace(conv, audio=keep, turns=[t for t in conv.turns if t.end_s < seconds - 0.5])


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def run_point(client, conversations: Sequence[Conversation], *, chunk_ms: float, realtime: bool,
                    client_transcripts: bool, timeout_s: float, server_pid: int | None,
                    sample_every_s: float = 0.25) -> tuple[list[StreamRun], float, dict[str, float] | None]:
    """All conversations at once; returns (streams, wall seconds, server RSS before/peak in MB)."""
    rss = {"before_mb": rss_mb(server_pid)} if server_pid else None
    rss_peak = rss["before_mb"] if rss else 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal rss_peak
        while not done.is_set():
            rss_peak = max(rss_peak, rss_mb(server_pid))
            try:
                await asyncio.wait_for(done.wait(), sample_every_s)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample()) if server_pid else None
    t0 = time.monotonic()
    runs = await asyncio.gather(*(stream_conversation(client, i, c, chunk_ms=chunk_ms, realtime=realtime,
                                                      client_transcripts=client_transcripts, timeout_s=timeout_s)
                                  for i, c in enumerate(conversations)))
    wall = time.monotonic() - t0
    done.set()
    if sampler:
        await sampler
        rss["peak_mb"] = rss_peak
    return list(runs), wall, rss


def latency_slope_ms_per_min(segments: Sequence[Segment]) -> float | None:
    """Least-squares slope of latency against the segment's place in its stream."""
    if len(segments) < 3:
        return None
    x = np.array([s.end_s for s in segments]) / 60.0
    if np.ptp(x) == 0:
        return None
    y = np.array([s.latency_s for s in segments]) * 1e3
    return float(np.polyfit(x, y, 1)[0])


def asr_summary(segments: Sequence[Segment]) -> dict[str, Any] | None:
    """Server ASR per segment at this load: queue wait and model-call time (percentiles), the mean
    batch, how often it decoded with a beam, and WER against the turns' words per voice."""
    from emoq_serve.metrics import word_error_rate  # lazy: scikit-learn

    runs = [s.asr for s in segments if s.asr is not None]
    if not runs:
        return None
    matched = [a for a in runs if a.reference is not None]
    wer = {}
    for voice in (sorted({a.voice for a in matched}) + ["all"]) if matched else []:
        pairs = [(a.reference, a.hypothesis) for a in matched if voice in ("all", a.voice)]
        wer[voice] = {"segments": len(pairs), "wer": word_error_rate(*map(list, zip(*pairs, strict=True)))}
    return {
        "segments": len(runs),
        "queue_ms": latency_summary(np.array([a.queue_ms for a in runs]) / 1e3),
        "compute_ms": latency_summary(np.array([a.compute_ms for a in runs]) / 1e3),
        "mean_batch": float(np.mean([a.batch_size for a in runs])),
        "beam_share": float(np.mean([a.beam_size > 1 for a in runs])),
        "wer": wer,
    }


def summarize_point(engine: str, runs: Sequence[StreamRun], wall_s: float, rss: dict[str, float] | None,
                    audio_seconds: float, latency_bound_ms: float, max_slope_ms_per_min: float) -> dict[str, Any]:
    segments = [s for r in runs for s in r.segments]
    answered = {(s.stream, s.turn) for s in segments if s.turn is not None}
    turns = sum(r.turns for r in runs)
    errors = collections.Counter(r.code for r in runs if r.code != "OK")
    latency = latency_summary(np.array([s.latency_s for s in segments]))
    slope = latency_slope_ms_per_min(segments)
    streams = len(runs)
    memory = None
    if rss:
        memory = {**rss, "per_stream_mb": (rss["peak_mb"] - rss["before_mb"]) / streams}
    reasons = []
    if errors:
        reasons.append(f"failed streams {dict(errors)}")
    if len(answered) < turns:
        reasons.append(f"{turns - len(answered)} turn(s) without a result")
    if not latency or latency["p95"] > latency_bound_ms:
        reasons.append(f"p95 above {latency_bound_ms:g} ms")
    if slope is not None and slope > max_slope_ms_per_min:
        reasons.append(f"latency grows {slope:.0f} ms/min")
    return {
        "engine": engine, "api": "conversation", "streams": streams, "turns": turns,
        "segments_ok": len(segments), "turns_answered": len(answered), "turns_missing": turns - len(answered),
        "false_segments": sum(s.turn is None for s in segments), "errors": dict(sorted(errors.items())),
        "audio_seconds": audio_seconds, "wall_s": wall_s, "realtime_factor": audio_seconds / streams / wall_s,
        "latency_ms": latency, "latency_slope_ms_per_min": slope, "memory": memory, "asr": asr_summary(segments),
        "sustained": not reasons, "why_not": reasons,
    }


def sustained_streams(points: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Per engine: the largest stream count such that it and every smaller count tried were sustained."""
    out: dict[str, int] = {}
    for engine in dict.fromkeys(p["engine"] for p in points):
        best = 0
        for p in sorted((p for p in points if p["engine"] == engine), key=lambda p: p["streams"]):
            if not p["sustained"]:
                break
            best = p["streams"]
        out[engine] = best
    return out


async def sweep(client, engine: str, conversations: Sequence[Conversation], counts: Sequence[int], *,
                chunk_ms: float, realtime: bool, client_transcripts: bool, timeout_s: float,
                server_pid: int | None, latency_bound_ms: float, max_slope_ms_per_min: float,
                progress=print) -> list[dict[str, Any]]:
    """One warm-up stream (unpaced, pays for first-batch costs), then each stream count in turn."""
    await stream_conversation(client, -1, head(conversations[0], WARMUP_SECONDS), chunk_ms=chunk_ms, realtime=False,
                              client_transcripts=client_transcripts, timeout_s=timeout_s)
    points = []
    for n in counts:
        chosen = list(conversations[:n])
        runs, wall, rss = await run_point(client, chosen, chunk_ms=chunk_ms, realtime=realtime,
                                          client_transcripts=client_transcripts, timeout_s=timeout_s,
                                          server_pid=server_pid)
        point = summarize_point(engine, runs, wall, rss, sum(c.duration_s for c in chosen), latency_bound_ms,
                                max_slope_ms_per_min)
        asr = point["asr"]
        asr_note = (f"ASR queue p95 {asr['queue_ms'].get('p95', float('nan')):.0f} ms, compute p50 "
                    f"{asr['compute_ms'].get('p50', float('nan')):.0f} ms, WER {asr['wer']['all']['wer']:.3f}, "
                    if asr else "")
        progress(f"{engine} streams={n}: {point['segments_ok']} segments, p95 "
                 f"{point['latency_ms'].get('p95', float('nan')):.0f} ms, {asr_note}"
                 f"{'sustained' if point['sustained'] else 'not sustained: ' + '; '.join(point['why_not'])}")
        points.append(point)
    return points
