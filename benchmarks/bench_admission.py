"""Admission under floods: `python -m benchmarks.bench_admission --bundle DIR`.

Two phases against one `emoq serve` (the bundle's own engine, server ASR on, default limits):

1. Unary flood: `--flood` concurrent calls of 6.4 s audio *without* transcripts (each needs the
   server's ASR), while a probe client sends transcript-bearing calls two at a time. Reported:
   every status seen (never INTERNAL/UNKNOWN), how fast refusals come back, the server's RSS
   growth, and the probe's p50 against the same probe on the idle server just before.
2. Fast stream: real-time conversations (client transcripts, `--streams` of them) alone, then the
   same beside one stream sending `--flood-minutes` of audio as fast as it can with
   `max_segment_s=1` and no transcripts. Reported: the real-time streams' p95 segment latency in
   both runs, the flood stream's segment results (scored or failed with a reason) and its status.

The record goes to `benchmarks/results/admission/<cpu class>.json`; it carries the machine, its
CPU flags and the command. A benchmark, not a test: it measures, the bounds it prints are the
issue's acceptance figures, and nothing here fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.conversation import run_point
from benchmarks.report import library_versions, machine_description
from benchmarks.server_proc import ServerProcess
from benchmarks.stats import latency_summary
from emoq_serve import hostinfo
from emoq_serve.config import SAMPLE_RATE

RESULTS = Path(__file__).parent / "results" / "admission"


async def _unary(client, audio: np.ndarray, transcript: str, timeout_s: float) -> tuple[str, float]:
    import grpc

    started = time.monotonic()
    try:
        await client.recognize(audio, SAMPLE_RATE, transcript, encoding="pcm16", timeout=timeout_s)
        code = "OK"
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    return code, time.monotonic() - started


async def _probe(client, audio: np.ndarray, n: int, stop: asyncio.Event | None = None) -> list[float]:
    """`n` transcript-bearing calls, two at a time (or until `stop`): their latencies in seconds."""
    out: list[float] = []

    async def worker() -> None:
        while len(out) < n and not (stop and stop.is_set()):
            code, seconds = await _unary(client, audio, "I am telling you this for the last time.", 30.0)
            if code == "OK":
                out.append(seconds)

    await asyncio.gather(worker(), worker())
    return out


async def unary_phase(address: str, pid: int, flood: int) -> dict:
    from benchmarks.conversation import rss_mb
    from emoq_serve.client.api import EmotionClient

    rng = np.random.default_rng(0)
    speechy = (0.2 * np.sin(2 * np.pi * 180 * np.arange(int(6.4 * SAMPLE_RATE)) / SAMPLE_RATE)
               * (1 + 0.5 * rng.standard_normal(int(6.4 * SAMPLE_RATE)))).astype(np.float32).clip(-1, 1)
    probe_audio = speechy[: 2 * SAMPLE_RATE]
    async with EmotionClient(address, retries=0) as client:
        await _probe(client, probe_audio, 4)  # warm-up
        idle = await _probe(client, probe_audio, 20)
        rss_before = rss_mb(pid)
        rss_peak = rss_before
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal rss_peak
            while not stop.is_set():
                rss_peak = max(rss_peak, rss_mb(pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        probe = asyncio.create_task(_probe(client, probe_audio, 10_000, stop))
        flood_results = await asyncio.gather(*(_unary(client, speechy, "", 120.0) for _ in range(flood)))
        stop.set()
        loaded = await probe
        await sampler
    codes = collections.Counter(code for code, _ in flood_results)
    refused = np.array([s for code, s in flood_results if code == "RESOURCE_EXHAUSTED"])
    return {
        "flood_calls": flood, "flood_codes": dict(codes),
        "refusal_latency_ms": latency_summary(refused),
        "served_latency_ms": latency_summary(np.array([s for code, s in flood_results if code == "OK"])),
        "rss_before_mb": round(rss_before, 1), "rss_growth_mb": round(rss_peak - rss_before, 1),
        "probe_idle_ms": latency_summary(np.array(idle)), "probe_loaded_ms": latency_summary(np.array(loaded)),
        "probe_p50_ratio": float(np.median(loaded) / np.median(idle)) if loaded and idle else None,
    }


async def fast_stream(client, minutes: float) -> dict:
    """One stream: `minutes` of speech-like audio as fast as gRPC takes it, max_segment_s=1, no transcripts."""
    import grpc

    from emoq_serve._proto import emoq_pb2 as pb

    from emoq_serve.data.conversation import make_conversation

    seconds = int(minutes * 60)
    speech = make_conversation(seconds=60.0, seed=7).audio  # real speech, so the VAD cuts segments
    audio = np.tile(speech, seconds // 60 + 1)[: seconds * SAMPLE_RATE]
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = 2 * SAMPLE_RATE  # one second of LINEAR16 per message
    config = pb.RecognitionConfig(encoding=pb.LINEAR16, sample_rate_hz=SAMPLE_RATE, segmentation=pb.VOICE_ACTIVITY,
                                  voice_activity=pb.VoiceActivityConfig(max_segment_s=1.0))

    async def messages():
        yield pb.StreamingRecognizeRequest(config=config)
        for start in range(0, len(pcm), step):
            yield pb.StreamingRecognizeRequest(audio_content=pcm[start:start + step])

    scored, failed = 0, collections.Counter()
    try:
        async for response in client.open_stream(messages(), timeout=seconds + 120):
            r = response.result
            if r.HasField("error"):
                failed[r.error.code] += 1
            elif r.is_final:
                scored += 1
        code = "OK"
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    return {"seconds_sent": seconds, "segments_scored": scored, "segments_failed_by_code": dict(failed), "code": code}


async def stream_phase(address: str, pid: int, streams: int, conversation_s: float, minutes: float) -> dict:
    from emoq_serve.client.api import EmotionClient
    from emoq_serve.data.conversation import make_conversation

    convs = [make_conversation(seconds=conversation_s, seed=100 + i) for i in range(streams)]
    out = {}
    async with EmotionClient(address, retries=0) as client:
        for name, with_flood in (("alone", False), ("beside_fast_stream", True)):
            flood = asyncio.create_task(fast_stream(client, minutes)) if with_flood else None
            runs, wall, rss = await run_point(client, convs, chunk_ms=100, realtime=True, client_transcripts=True,
                                              timeout_s=conversation_s + 120, server_pid=pid)
            latencies = np.array([s.latency_s for r in runs for s in r.segments if s.turn is not None])
            out[name] = {"segment_latency_ms": latency_summary(latencies),
                         "codes": dict(collections.Counter(r.code for r in runs)), "rss_mb": rss,
                         "turns": sum(r.turns for r in runs),
                         "turns_answered": len({(s.stream, s.turn) for r in runs for s in r.segments if s.turn is not None})}
            if flood is not None:
                out[name]["fast_stream"] = await flood
    p95 = [out[k]["segment_latency_ms"].get("p95") for k in ("alone", "beside_fast_stream")]
    out["p95_added_ms"] = p95[1] - p95[0] if None not in p95 else None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--flood", type=int, default=256, help="concurrent unary calls without transcripts")
    p.add_argument("--streams", type=int, default=4, help="real-time conversation streams")
    p.add_argument("--conversation-seconds", type=float, default=60.0)
    p.add_argument("--flood-minutes", type=float, default=10.0, help="audio the fast stream sends")
    p.add_argument("--serve-args", default="", help="extra `emoq serve` flags")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/admission/<cpu class>.json)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / f"{hostinfo.cpu_class()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with ServerProcess(Path(args.bundle), "onnx", out.with_suffix(".server.log"), args.serve_args) as server:
        record = {
            "command": " ".join(["python -m benchmarks.bench_admission", *(argv or sys.argv[1:])]),
            "machine": {**machine_description(), "cpu_flags": hostinfo.simd_flags(), "cpu_class": hostinfo.cpu_class()},
            "versions": library_versions(),
            "unary_flood": asyncio.run(unary_phase(server.address, server.pid, args.flood)),
            "fast_stream": asyncio.run(stream_phase(server.address, server.pid, args.streams,
                                                    args.conversation_seconds, args.flood_minutes)),
        }
    out.write_text(json.dumps(record, indent=2) + "\n")
    u, s = record["unary_flood"], record["fast_stream"]
    print(f"unary flood: codes {u['flood_codes']}, refusals p95 {u['refusal_latency_ms'].get('p95', float('nan')):.0f} ms, "
          f"RSS +{u['rss_growth_mb']} MB, probe p50 x{u['probe_p50_ratio']:.2f} of idle")
    print(f"fast stream: real-time p95 {s['alone']['segment_latency_ms'].get('p95', float('nan')):.0f} ms alone, "
          f"+{s['p95_added_ms']:.0f} ms beside it; fast stream {s['beside_fast_stream']['fast_stream']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
