"""Conversation streaming core at unit level, with the real Silero VAD model (onnxruntime) and
espeak-ng conversations: the VAD wrapper's streaming contract, the segmenter's cuts against the
generator's ground truth, forced cuts, bounded memory, and the generator itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.conversation import load_conversation, make_conversation
from emoq_serve.speech.vad import CONTEXT, WINDOW, SileroVad, VadBatcher, VadParams, default_model_path
from emoq_serve.speech.segmenter import Segmenter

#: The issue's tolerance between a segment's (padded) bounds and the turn's trimmed speech extent.
BOUNDARY_TOLERANCE_S = 0.3


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def conversation():
    return make_conversation(n_turns=5, seed=1)


def segment_all(vad: SileroVad, audio: np.ndarray, params: VadParams, chunks=None):
    """Feed `audio` in chunks of the given sizes (cycled; default 100 ms); returns (segments, max buffered)."""
    seg = Segmenter(vad, params)
    sizes = chunks or [1600]
    out, i, k, peak = [], 0, 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        out += seg.feed(audio[i:i + n])
        peak = max(peak, seg.buffered_samples)
        i, k = i + n, k + 1
    return out + seg.finish(), peak


# --- the VAD wrapper ------------------------------------------------------------------------------


def test_vad_matches_the_packages_own_streaming_wrapper(vad, conversation):
    """Step by step, our ORT wrapper (576-sample input with carried context and state) gives the
    probabilities of silero_vad's OnnxWrapper, the package's reference implementation."""
    from silero_vad.utils_vad import OnnxWrapper

    ref = OnnxWrapper(str(default_model_path()), force_onnx_cpu=True)
    audio = conversation.audio[: 3 * SAMPLE_RATE]
    state = vad.new_state()
    ours, theirs = [], []
    for i in range(0, len(audio) - WINDOW + 1, WINDOW):
        w = audio[i:i + WINDOW]
        ours.append(float(vad.step([state], w[None])[0]))
        theirs.append(float(ref(torch.from_numpy(w.copy()), SAMPLE_RATE).item()))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert max(ours) > 0.9 and min(ours) < 0.1  # speech and silence are both in these 3 s


def test_vad_batched_step_equals_each_stream_alone(vad, conversation):
    a, b = conversation.audio[:SAMPLE_RATE], conversation.audio[SAMPLE_RATE * 6:SAMPLE_RATE * 7]
    alone = []
    for x in (a, b):
        s = vad.new_state()
        alone.append([float(vad.step([s], x[i:i + WINDOW][None])[0]) for i in range(0, len(x) - WINDOW + 1, WINDOW)])
    sa, sb = vad.new_state(), vad.new_state()
    batched = [vad.step([sa, sb], np.stack([a[i:i + WINDOW], b[i:i + WINDOW]]))
               for i in range(0, len(a) - WINDOW + 1, WINDOW)]
    np.testing.assert_allclose(np.array(batched), np.array(alone).T, atol=1e-5)
    np.testing.assert_array_equal(sa.context, a[len(alone[0]) * WINDOW - CONTEXT:len(alone[0]) * WINDOW])


def test_vad_batcher_scores_many_streams_together_like_each_alone(vad, conversation):
    """Streams submitted at once, with different chunk lengths, are stepped together (batches > 1)
    and each gets the probabilities (and ends in the state) of its own sequential run."""
    audio = conversation.audio
    starts, lengths = [0, 3, 7, 11, 2, 5], [40, 17, 33, 5, 26, 40]  # in windows
    clips = [audio[s * WINDOW * 9:(s * 9 + n) * WINDOW].reshape(n, WINDOW) for s, n in zip(starts, lengths)]
    alone, alone_states = [], []
    for w in clips:
        st = vad.new_state()
        alone.append(vad.scores(st, w))
        alone_states.append(st)
    batcher = VadBatcher(vad, max_batch=4)
    try:
        states = [vad.new_state() for _ in clips]
        with batcher._cv:  # hold the thread until all are queued, so the ticks are certainly shared
            futures = [batcher.submit(st, w) for st, w in zip(states, clips)]
        got = [f.result(timeout=30) for f in futures]
        with pytest.raises(ValueError, match=r"windows must be \[k, 512\]"):
            batcher.submit(vad.new_state(), np.zeros((3, 500), np.float32))
        assert batcher.submit(vad.new_state(), np.zeros((0, WINDOW), np.float32)).result().shape == (0,)
        with batcher._cv:  # a gone call's job is dropped, not scored
            cancelled = batcher.submit(vad.new_state(), clips[0])
            assert cancelled.cancel()
        assert batcher.submit(vad.new_state(), clips[3]).result(timeout=30).shape == (5,)
    finally:
        batcher.close()
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a, atol=1e-5)
    for st, ref in zip(states, alone_states):
        np.testing.assert_allclose(st.state, ref.state, atol=1e-5)
        np.testing.assert_array_equal(st.context, ref.context)
    assert batcher.largest_batch == 4  # the cap holds, and streams were batched
    assert batcher.windows >= sum(lengths) and batcher.steps < batcher.windows
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(vad.new_state(), clips[0])


def test_vad_batcher_fails_the_jobs_of_a_broken_step_and_keeps_running(vad, conversation):
    """A step that raises fails the jobs it was scoring (their callers see the error); the thread
    lives on and scores the next job."""
    batcher = VadBatcher(vad)
    good = conversation.audio[:8 * WINDOW].reshape(8, WINDOW)
    try:
        bad_state = vad.new_state()
        bad_state.state = np.zeros((2, 1, 7), np.float32)  # the model refuses this shape
        with pytest.raises(Exception, match="state|dimension|shape|Got"):
            batcher.submit(bad_state, good).result(timeout=30)
        np.testing.assert_allclose(batcher.submit(vad.new_state(), good).result(timeout=30),
                                   vad.scores(vad.new_state(), good), atol=1e-5)
    finally:
        batcher.close()


def test_a_raising_batch_hook_neither_kills_the_vad_thread_nor_its_streams(vad, conversation):
    """The metrics hook runs after each step; on main 9b76bb9 it ran outside the thread's `try`,
    so one raise killed the thread and every VOICE_ACTIVITY stream waited forever."""
    def broken_hook(size: int) -> None:
        raise RuntimeError("metrics backend down")

    batcher = VadBatcher(vad, on_batch=broken_hook)
    good = conversation.audio[:8 * WINDOW].reshape(8, WINDOW)
    try:
        for _ in range(2):  # the second job proves the thread outlived the first hook's raise
            np.testing.assert_allclose(batcher.submit(vad.new_state(), good).result(timeout=10),
                                       vad.scores(vad.new_state(), good), atol=1e-5)
        assert batcher.healthy()
    finally:
        batcher.close()
    assert not batcher.healthy()  # a stopped thread is reported, not assumed alive


def test_vad_refuses_misshapen_windows_and_bad_params(vad):
    with pytest.raises(ValueError, match=r"windows must be \[2, 512\]"):
        vad.step([vad.new_state(), vad.new_state()], np.zeros((2, 500), np.float32))
    with pytest.raises(ValueError, match="speech_pad_ms"):
        VadParams(min_silence_ms=200, speech_pad_ms=300)
    with pytest.raises(ValueError, match="threshold"):
        VadParams(threshold=1.5)


# --- the segmenter ---------------------------------------------------------------------------------


def test_one_segment_per_turn_within_tolerance(vad, conversation):
    segments, _ = segment_all(vad, conversation.audio, VadParams())
    assert [s.index for s in segments] == list(range(len(conversation.turns)))
    for seg, turn in zip(segments, conversation.turns, strict=True):
        assert abs(seg.start_s - turn.start_s) <= BOUNDARY_TOLERANCE_S, (seg, turn)
        assert abs(seg.end_s - turn.end_s) <= BOUNDARY_TOLERANCE_S, (seg, turn)
        assert not seg.forced
        # The segment's audio is exactly that span of the stream.
        np.testing.assert_array_equal(seg.audio, conversation.audio[seg.start_sample:seg.end_sample])


def test_chunking_never_changes_the_segments(vad, conversation):
    whole, _ = segment_all(vad, conversation.audio, VadParams(), chunks=[len(conversation.audio)])
    odd, _ = segment_all(vad, conversation.audio, VadParams(), chunks=[1, 511, 513, 4000, 77])
    assert [(s.start_s, s.end_s) for s in odd] == [(s.start_s, s.end_s) for s in whole]


def test_forced_cut_at_max_segment_length(vad, conversation):
    params = VadParams(max_segment_s=1.0, speech_pad_ms=100, min_speech_ms=100)
    segments, _ = segment_all(vad, conversation.audio, params)
    assert all(s.end_s - s.start_s <= params.max_segment_s + 1e-9 for s in segments)
    assert sum(s.forced for s in segments) >= len(conversation.turns)  # every turn is longer than 1 s
    # A forced cut does not lose speech: each turn's extent is covered by its segments.
    for turn in conversation.turns:
        inside = sorted((s.start_s, s.end_s) for s in segments if s.end_s > turn.start_s and s.start_s < turn.end_s)
        assert inside[0][0] <= turn.start_s + BOUNDARY_TOLERANCE_S
        assert inside[-1][1] >= turn.end_s - BOUNDARY_TOLERANCE_S
        # Pieces are contiguous but for a short dropped tail (a continuation under min_speech_ms).
        assert all(b[0] - a[1] < BOUNDARY_TOLERANCE_S for a, b in zip(inside, inside[1:]))


def test_buffered_samples_are_bounded_whatever_the_stream_length(vad, conversation):
    """Memory: the open segment (at most max_segment_s) plus padding and a window, never the stream."""
    params = VadParams(max_segment_s=2.0)
    long_stream = np.tile(conversation.audio, 4)  # ~100 s
    segments, peak = segment_all(vad, long_stream, params, chunks=[8000])
    assert len(segments) >= 4 * len(conversation.turns)
    bound = params.max_segment_s * SAMPLE_RATE + 2 * WINDOW + 8000  # plus one chunk not yet scored
    assert peak <= bound, f"held {peak} samples, bound {bound}"
    short, short_peak = segment_all(vad, conversation.audio, params, chunks=[8000])
    assert peak <= short_peak + 8000  # four times the stream, the same memory (up to one chunk's alignment)


def test_short_bursts_are_dropped(vad, conversation):
    """A click (one loud 30 ms burst) is not a segment; min_speech_ms drops it."""
    audio = np.zeros(3 * SAMPLE_RATE, np.float32)
    turn = conversation.turns[0]
    speech = conversation.audio[round(turn.start_s * SAMPLE_RATE):round(turn.end_s * SAMPLE_RATE)]
    audio[SAMPLE_RATE:SAMPLE_RATE + 480] = speech[SAMPLE_RATE // 2:SAMPLE_RATE // 2 + 480]
    segments, _ = segment_all(vad, audio, VadParams())
    assert segments == []


def test_feed_after_finish_is_refused(vad):
    seg = Segmenter(vad, VadParams())
    seg.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        seg.feed(np.zeros(10, np.float32))


# --- the generator -----------------------------------------------------------------------------


def test_generator_ground_truth_and_round_trip(conversation, tmp_path):
    c = conversation
    assert len(c.turns) == 5 and len({t.speaker for t in c.turns}) == 2
    assert all(a.speaker != b.speaker for a, b in zip(c.turns, c.turns[1:]))  # turns alternate
    for a, b in zip(c.turns, c.turns[1:]):
        gap = b.start_s - a.end_s
        assert c.pause_s[0] - 0.01 <= gap <= c.pause_s[1] + 0.01
    # Trimmed extents: the audio between turns is silent, and each extent holds speech.
    for a, b in zip(c.turns, c.turns[1:]):
        between = c.audio[round(a.end_s * SAMPLE_RATE) + 160:round(b.start_s * SAMPLE_RATE) - 160]
        assert np.abs(between).max() < 0.02
    for t in c.turns:
        inside = c.audio[round(t.start_s * SAMPLE_RATE):round(t.end_s * SAMPLE_RATE)]
        assert np.sqrt(np.mean(inside ** 2)) > 0.01
    c.save(tmp_path)
    back = load_conversation(tmp_path)
    np.testing.assert_array_equal(back.audio, c.audio)
    assert back.turns == c.turns


def test_generator_is_deterministic_and_prefix_stable(conversation):
    again = make_conversation(n_turns=3, seed=1)
    assert again.turns == conversation.turns[:3]
    fixed = make_conversation(seconds=12.0, seed=1)
    assert fixed.duration_s == 12.0 and fixed.turns == conversation.turns[:len(fixed.turns)]
    assert make_conversation(n_turns=2, seed=2).turns[0].transcript != conversation.turns[0].transcript or \
        make_conversation(n_turns=2, seed=2).turns[0].label != conversation.turns[0].label


@pytest.mark.skipif(not __import__("emoq_serve.data.speech", fromlist=["x"]).piper_available(),
                    reason="Piper not installed")
def test_generator_speaks_with_both_voices_and_stays_prefix_stable():
    """voices="mix": speakers alternate between an espeak-ng voice and the Piper voice; a Piper
    turn renders alone in its own seeded session, so a shorter conversation is a prefix. Four
    turns and two, about 4 s on an idle 2-core machine."""
    from emoq_serve.data.speech import PIPER_VOICE, VOICES

    mixed = make_conversation(n_turns=4, seed=1, voices="mix")
    assert {t.voice for t in mixed.turns} == {PIPER_VOICE, mixed.speakers["A"]["voice"]}
    assert mixed.speakers["A"]["voice"] in VOICES and mixed.speakers["B"]["voice"] == PIPER_VOICE
    for t in mixed.turns:
        inside = mixed.audio[round(t.start_s * SAMPLE_RATE):round(t.end_s * SAMPLE_RATE)]
        assert np.sqrt(np.mean(inside ** 2)) > 0.01
    short = make_conversation(n_turns=2, seed=1, voices="mix")
    assert short.turns == mixed.turns[:2]
    end = round(short.turns[-1].end_s * SAMPLE_RATE)
    np.testing.assert_array_equal(short.audio[:end], mixed.audio[:end])
    # The plan (speakers, labels, texts) is the espeak-only conversation's.
    assert [(t.speaker, t.label, t.transcript) for t in mixed.turns[:2]] == \
        [(t.speaker, t.label, t.transcript) for t in make_conversation(n_turns=2, seed=1).turns]
    with pytest.raises(ValueError, match="voices"):
        make_conversation(n_turns=2, voices="robots")


def test_generator_refuses_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        make_conversation(seconds=10.0, n_turns=2)
    with pytest.raises(ValueError, match="pause_s"):
        make_conversation(n_turns=2, pause_s=(1.0, 0.5))
    with pytest.raises(ValueError, match="labels"):
        make_conversation(n_turns=2, labels=("bored",))


def test_a_closed_segment_is_not_held_twice(vad, conversation):
    """Once a segment is handed out (the server holds it until its result is sent), the segmenter
    keeps only the next segment's pre-padding and a partial window."""
    params = VadParams()
    seg = Segmenter(vad, params)
    closed = 0
    for i in range(0, len(conversation.audio), 1600):
        if seg.feed(conversation.audio[i:i + 1600]):
            closed += 1
            assert seg.buffered_samples <= params.speech_pad_ms * 16 + 1600 + WINDOW
    assert closed == len(conversation.turns)
