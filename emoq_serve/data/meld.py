"""MELD reader: the official utterance CSVs, with audio when the clip archive is present.

`train_sent_emo.csv`, `dev_sent_emo.csv` and `test_sent_emo.csv` give the official split; a
missing file yields an empty split. Audio for split S is looked up as `dia{D}_utt{U}` (.wav,
.flac or .mp4) in the first existing folder of `_AUDIO_DIRS[S]` under the MELD root (the
release's folder names and short ones); ids restart in every split, so folders are per split.
Without a clip the example is text-only (audio=None).

Text: releases differ in encoding. Some are clean UTF-8, others were saved as cp1252 (a lone
byte 0x92 for an apostrophe) or carry UTF-8 mojibake ("â€™"). All become the same clean text
with typographic punctuation folded to ASCII, so a tokenizer sees one spelling.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

from emoq_serve.audio import load_audio
from emoq_serve.config import LABEL_SETS
from emoq_serve.data.types import Corpus, Example

SPLIT_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
_AUDIO_DIRS = {
    "train": ("train", "train_splits", "audio/train"),
    "dev": ("dev", "dev_splits_complete", "audio/dev"),
    "test": ("test", "output_repeated_splits_test", "test_splits", "audio/test"),
}
_AUDIO_EXTENSIONS = (".wav", ".flac", ".mp4")
_ASCII_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                              "\u2013": "-", "\u2014": "-", "\u00a0": " "})


def _undo_mojibake(s: str) -> str:
    """UTF-8 bytes once decoded as cp1252 ("â€™") back to text; anything else unchanged.
    Bytes cp1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) survive as C1 characters."""
    raw = bytearray()
    for c in s:
        try:
            raw += c.encode("cp1252")
        except UnicodeEncodeError:
            if ord(c) > 0xFF:
                return s
            raw.append(ord(c))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return s


def clean_text(s: str) -> str:
    """Repair cp1252/UTF-8 mix-ups and fold typographic punctuation to ASCII."""
    if "\u00e2\u20ac" in s or "\u00c3" in s:
        s = _undo_mojibake(s)
    # C1 controls (U+0080..U+009F) are cp1252 bytes decoded as latin-1: map them back.
    s = "".join(bytes([ord(c)]).decode("cp1252", errors="ignore") if 0x80 <= ord(c) <= 0x9F else c for c in s)
    return unicodedata.normalize("NFKC", s).translate(_ASCII_PUNCT).strip()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _audio_index(root: Path, split: str) -> dict[str, Path]:
    """Clip stem -> path for one split, from one directory listing (not a stat per row)."""
    index: dict[str, Path] = {}
    for folder in reversed(_AUDIO_DIRS[split]):  # earlier folders win
        if (root / folder).is_dir():
            for ext in reversed(_AUDIO_EXTENSIONS):  # .wav wins over .mp4
                index.update({p.stem: p for p in (root / folder).glob(f"dia*_utt*{ext}")})
    return index


def read_split(root: Path, split: str, labels: tuple[str, ...]) -> list[Example]:
    """One split's examples; rows whose emotion is outside `labels` are dropped (but stay in
    the later turns' dialogue context, which holds every earlier row of the dialogue)."""
    path = root / SPLIT_FILES[split]
    if not path.is_file():
        return []
    audio = _audio_index(root, split)
    rows = list(csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline="")))
    rows.sort(key=lambda r: (int(r["Dialogue_ID"]), int(r["Utterance_ID"])))  # stable: file order on ties
    examples, context, dialogue = [], [], None
    for row in rows:
        if row["Dialogue_ID"] != dialogue:
            dialogue, context = row["Dialogue_ID"], []
        speaker, text = clean_text(row["Speaker"]) or None, clean_text(row["Utterance"])
        emotion = row["Emotion"].strip().lower()
        if emotion in labels:
            stem = f"dia{int(row['Dialogue_ID'])}_utt{int(row['Utterance_ID'])}"
            audio_path = audio.get(stem)
            examples.append(Example(
                id=f"{split}/{stem}",
                audio=load_audio(audio_path) if audio_path else None,
                transcript=text,
                label=labels.index(emotion),
                speaker=speaker,
                context=tuple(context),
            ))
        context.append((speaker, text))
    return examples


def load_meld(root: str | Path, num_classes: int = 4) -> Corpus:
    """MELD with 4 classes (neutral, anger, sadness, joy) or all 7."""
    if num_classes not in (4, 7):
        raise ValueError(f"MELD has a 4-class and a 7-class setup; got {num_classes}")
    root = Path(root)
    if not any((root / f).is_file() for f in SPLIT_FILES.values()):
        raise FileNotFoundError(f"no MELD CSVs ({', '.join(SPLIT_FILES.values())}) in {root}")
    labels = LABEL_SETS[f"meld{num_classes}"]
    return Corpus(labels, *(read_split(root, split, labels) for split in SPLIT_FILES))
