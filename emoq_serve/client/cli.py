"""`emoq client FILE...`: send audio files to a server, print a table (or JSON lines)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict

import grpc
import soundfile as sf

from emoq_serve.audio import to_mono
from emoq_serve.client.api import EmotionClient, EmotionResult


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


async def _run(args: argparse.Namespace) -> int:
    servers = [a for a in args.server.split(",") if a]  # several front doors: round-robin over them
    client = EmotionClient(
        servers if len(servers) > 1 else args.server, token=args.token or os.environ.get("EMOQ_TOKEN"), root_cert=_read(args.tls_ca),
        client_cert=_read(args.tls_cert), client_key=_read(args.tls_key), timeout=args.timeout,
        retries=args.retries,
    )
    rows: list[tuple[str, EmotionResult, float]] = []
    failed = 0
    async with client:
        for path in args.files:
            audio, sr = sf.read(path, dtype="float32", always_2d=False)
            audio = to_mono(audio)
            t0 = time.perf_counter()
            try:
                if args.conversation:
                    from emoq_serve.client.conversation import run_conversation

                    await run_conversation(client, path, audio, sr, args)
                elif args.stream:
                    async for r in client.stream(
                        audio, sr, args.text, args.speaker, chunk_ms=args.chunk_ms, realtime=args.realtime,
                        interim=args.interim,
                    ):
                        rows.append(_emit(args, path, r, t0))
                else:
                    rows.append(_emit(args, path, await client.recognize(audio, sr, args.text, args.speaker), t0))
            except grpc.aio.AioRpcError as exc:
                failed += 1
                print(f"{path}: {exc.code().name}: {exc.details()}")
    if not args.json and rows:
        print(format_table(rows))
    return 1 if failed else 0


def _emit(args: argparse.Namespace, path: str, r: EmotionResult, t0: float) -> tuple[str, EmotionResult, float]:
    wall_ms = (time.perf_counter() - t0) * 1e3
    if args.json:
        print(json.dumps({"file": path, "client_ms": round(wall_ms, 2), **asdict(r)}), flush=True)
    return path, r, wall_ms


def format_table(rows: list[tuple[str, EmotionResult, float]]) -> str:
    """Aligned text table: file, final/interim, audio seconds, label, per-class scores, latency."""
    labels = list(rows[0][1].probabilities)
    header = ["file", "kind", "audio_s", "label", *labels, "server_ms", "client_ms"]
    body = [
        [
            path, "final" if r.is_final else "interim", f"{r.audio_seconds:.2f}", r.label,
            *(f"{r.probabilities[label]:.3f}" for label in labels), f"{r.timings_ms['total']:.1f}", f"{wall:.1f}",
        ]
        for path, r, wall in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body])
