"""SIGTERM under load, against a stand-in server process on 127.0.0.1 (complements the single-call
drain tests in test_server.py).

Accepted calls finish (or, past the drain timeout, end with UNAVAILABLE and a message); health
turns NOT_SERVING at once and stays reachable; new calls are refused; the process exits cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import spawn_server, tone

from emoq_serve.client.api import EmotionClient


async def sigterm_under_load(port: int, proc, streams: int, seconds: float, unary: int) -> dict:
    """Start `streams` real-time streams of `seconds` audio and `unary` calls; once every stream has
    had an interim result (so it is accepted and running), SIGTERM the server, then check health and
    a new call. Returns the outcomes."""
    running = asyncio.Event()
    interim_seen = 0

    async def stream(client: EmotionClient, i: int) -> tuple[str, str]:
        nonlocal interim_seen
        try:
            async for r in client.stream(tone(seconds, freq=200 + 20 * i), 16_000, f"stream {i}", chunk_ms=100,
                                         realtime=True, interim=True, timeout=60):
                if not r.is_final and r.audio_seconds <= 0.25:
                    interim_seen += 1
                    if interim_seen == streams:
                        running.set()
                elif r.is_final:
                    return ("OK" if abs(r.audio_seconds - seconds) < 1e-3 else "TRUNCATED"), ""
            return "NO_FINAL", ""
        except grpc.aio.AioRpcError as err:
            return err.code().name, err.details()

    async def call(client: EmotionClient) -> tuple[str, str]:
        try:
            await client.recognize(tone(0.5), 16_000, timeout=60)
            return "OK", ""
        except grpc.aio.AioRpcError as err:
            return err.code().name, err.details()

    # No client retries: the test checks the server's own answer to a call refused while draining.
    async with EmotionClient(f"127.0.0.1:{port}", retries=0) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        tasks = [asyncio.create_task(stream(client, i)) for i in range(streams)]
        await asyncio.wait_for(running.wait(), 30)
        tasks += [asyncio.create_task(call(client)) for _ in range(unary)]
        await asyncio.sleep(0.05)  # the unary calls are in the queue
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            await asyncio.sleep(0.01)
        not_serving_after = time.monotonic() - t_signal
        refused = await call(client)
        outcomes = await asyncio.gather(*tasks)
        finished_after = time.monotonic() - t_signal
    return {"outcomes": outcomes, "refused": refused, "not_serving_s": not_serving_after, "finished_s": finished_after}


def stop_process(proc) -> float:
    """Wait for the drained server to exit; seconds it took."""
    t0 = time.monotonic()
    try:
        assert proc.stdout.readline().strip() == "stopped"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return time.monotonic() - t0


def test_sigterm_under_load_completes_every_accepted_call():
    proc, port = spawn_server(delay_s=0.05, batcher={"max_batch": 8, "max_queue_delay_ms": 10}, interim_span_s=0.2,
                              drain_timeout_s=20)
    try:
        result = asyncio.run(sigterm_under_load(port, proc, streams=24, seconds=1.5, unary=8))
    finally:
        exit_s = stop_process(proc)
    codes = [code for code, _ in result["outcomes"]]
    code, message = result["refused"]
    print(
        f"\nSIGTERM under load: health NOT_SERVING after {result['not_serving_s'] * 1e3:.0f} ms; "
        f"{codes.count('OK')}/{len(codes)} in-flight calls completed (24 streams, 8 unary) "
        f"{result['finished_s']:.2f} s after the signal; new call: {code}"
    )
    assert codes == ["OK"] * 32  # every accepted call finished with its full result
    assert code == "UNAVAILABLE" and "shutting down" in message
    assert result["not_serving_s"] < 0.5 and exit_s < 5


def test_drain_timeout_cuts_off_the_rest_with_a_status():
    """Streams that would run 6 s more get UNAVAILABLE with a message at the 1 s drain timeout."""
    proc, port = spawn_server(delay_s=0.05, batcher={"max_batch": 8, "max_queue_delay_ms": 10}, interim_span_s=0.2,
                              drain_timeout_s=1.0)
    try:
        result = asyncio.run(sigterm_under_load(port, proc, streams=8, seconds=6.0, unary=4))
    finally:
        stop_process(proc)
    by_code = {}
    for code, message in result["outcomes"]:
        by_code.setdefault(code, []).append(message)
    print(f"\ndrain timeout 1 s: {sorted((c, len(m)) for c, m in by_code.items())}, all ended {result['finished_s']:.2f} s after SIGTERM; "
          f"messages: {sorted({(c, m) for c, ms in by_code.items() for m in ms})}")
    assert sorted(by_code) == ["OK", "UNAVAILABLE"] and len(by_code["OK"]) == 4  # the unary calls finished
    assert len(by_code["UNAVAILABLE"]) == 8 and all("drain timeout 1 s" in m for m in by_code["UNAVAILABLE"])
    assert result["finished_s"] < 3.0  # nothing waited past the drain timeout (plus slack)
