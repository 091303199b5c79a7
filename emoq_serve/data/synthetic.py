"""A synthetic 4-class emotion corpus in which words, prosody, or both carry the label.

Why: real emotional speech (IEMOCAP) is licensed and absent here, yet the demo, the tests and
the tiny trainer need data whose labels a small model can learn from *either* modality.

Every sentence is a neutral body ("We moved the boxes") plus a clause. The clause is emotional
("I am furious") when the text carries the cue, neutral ("as planned") otherwise. The voice
uses the class prosody when the audio carries the cue, neutral prosody otherwise:

- neutral: mid pitch, normal rate, normal loudness;
- angry:   raised pitch, fast, loud, exclamation contour;
- sad:     low pitch, slow, quiet, longer pauses between words;
- happy:   high pitch, fast-ish, bright, exclamation contour.

Emotional classes split into thirds by cue: "both", "text" (emotional words, neutral voice)
and "prosody" (neutral words, emotional voice); neutral examples have cue "both". Small
per-utterance jitter and six speaker voices keep the classes from being single points.
Generation is deterministic by seed and cached on disk under `$EMOQ_CACHE/synthetic`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from emoq_serve.config import LABEL_SETS, cache_root
from emoq_serve.data.speech import VOICES, Prosody, render, resolve_backend
from emoq_serve.data.types import Corpus, Example

LABELS = LABEL_SETS["synthetic4"]
CUES = ("both", "text", "prosody")
_VERSION = 2  # bump when anything below changes what is generated (invalidates caches)

CLASS_PROSODY = {
    "neutral": Prosody(pitch=45, speed=165, amplitude=90),
    "angry": Prosody(pitch=70, speed=210, amplitude=160, exclaim=True),
    "sad": Prosody(pitch=20, speed=150, amplitude=50, word_gap=2, tape=0.85),
    "happy": Prosody(pitch=95, speed=185, amplitude=110, exclaim=True),
}
_JITTER = {"pitch": 5, "speed": 10, "amplitude": 10}  # uniform +- per utterance

SUBJECTS = ("I", "We", "They", "She", "He", "Mom", "Dad", "Anna")
PREDICATES = (
    "moved the boxes", "checked the schedule", "parked the car", "read the report", "called the office",
    "opened the window", "sent the letter", "fixed the printer", "cleaned the kitchen", "booked the tickets",
    "changed the plan", "sold the house",
)
CLAUSES = {
    "neutral": ("as planned", "as usual", "on time", "this morning", "for work", "last week"),
    "angry": ("I am furious", "this is outrageous", "I hate this", "how dare they", "I am angry"),
    "sad": ("I feel lonely", "my heart aches", "I could cry", "I miss them", "I am heartbroken"),
    "happy": ("I am thrilled", "wonderful news", "I love it", "I am happy", "this is fantastic"),
}


def cache_dir() -> Path:
    """Where generated corpora live."""
    return cache_root()


def _jitter(p: Prosody, rng: np.random.Generator) -> Prosody:
    return dataclasses.replace(p, **{k: getattr(p, k) + int(rng.integers(-d, d + 1)) for k, d in _JITTER.items()})


def _plan_split(split: str, n_per_class: int, seed: int) -> list[tuple[Example, Prosody]]:
    """Texts, labels, cues, speakers and prosody of one split (audio comes later, batched)."""
    rng = np.random.default_rng([seed, ("train", "dev", "test").index(split)])
    plan = []
    for label, name in enumerate(LABELS):
        for i in range(n_per_class):
            cue = "both" if name == "neutral" else CUES[i % len(CUES)]
            words_emotional = cue in ("both", "text")
            voice_emotional = cue in ("both", "prosody")
            clause_set = CLAUSES[name if words_emotional else "neutral"]
            text = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}, {rng.choice(clause_set)}."
            prosody = _jitter(CLASS_PROSODY[name if voice_emotional else "neutral"], rng)
            speaker = str(rng.choice(VOICES))
            plan.append((Example("", None, text, label, speaker, cue), prosody))
    order = rng.permutation(len(plan))
    plan = [plan[j] for j in order]
    for idx, (ex, _) in enumerate(plan):
        ex.id = f"synthetic-{split}-{idx:05d}"
    return plan


def _save(path: Path, corpus: Corpus) -> None:
    rows, clips = [], []
    for split, examples in corpus.splits().items():
        for ex in examples:
            rows.append({"split": split, **{k: v for k, v in dataclasses.asdict(ex).items() if k != "audio"}})
            clips.append(np.round(ex.audio * 32768.0).astype(np.int16))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, audio=np.concatenate(clips), lengths=np.array([len(c) for c in clips]),
             meta=np.array(json.dumps(rows)))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _load(path: Path) -> Corpus:
    with np.load(path) as f:
        audio, lengths, rows = f["audio"], f["lengths"], json.loads(str(f["meta"]))
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for row, start, n in zip(rows, np.cumsum(lengths) - lengths, lengths, strict=True):
        split = row.pop("split")
        splits[split].append(Example(audio=audio[start:start + n].astype(np.float32) / 32768.0, **row))
    return Corpus(LABELS, **splits)


def make_corpus(n_per_class: int = 150, seed: int = 0, backend: str = "auto", use_cache: bool = True) -> Corpus:
    """`n_per_class` training clips per class, and ceil(n/4) per class in dev and in test."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1; got {n_per_class}")
    backend = resolve_backend(backend)
    held_out = math.ceil(n_per_class / 4)
    key = hashlib.sha256(json.dumps([_VERSION, n_per_class, seed, backend]).encode()).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{key}.npz"
    if use_cache and path.is_file():
        return _load(path)
    plans = {s: _plan_split(s, n, seed) for s, n in (("train", n_per_class), ("dev", held_out), ("test", held_out))}
    items = [(ex.transcript, prosody, ex.speaker) for plan in plans.values() for ex, prosody in plan]
    clips = iter(render(items, backend))
    for plan in plans.values():
        for ex, _ in plan:
            ex.audio = next(clips)
    corpus = Corpus(LABELS, *([ex for ex, _ in plans[s]] for s in ("train", "dev", "test")))
    if use_cache:
        _save(path, corpus)
    return corpus


#: The demo set: (id, label, cue, text). Both modalities agree, except the last clip, where
#: neutral words are spoken angrily and only the prosody says "angry".
DEMO = (
    ("demo-neutral", "neutral", "both", "Dad read the report, as planned."),
    ("demo-angry", "angry", "both", "They changed the plan, I am furious."),
    ("demo-sad", "sad", "both", "Mom sold the house, I miss them."),
    ("demo-happy", "happy", "both", "We booked the tickets, I am thrilled."),
    ("demo-angry-prosody-only", "angry", "prosody", "She checked the schedule, as usual."),
)


def demo_utterances(seed: int = 0, backend: str = "auto") -> list[Example]:
    """One clip per emotion plus a prosody-only one; `cue` says which modality carries it."""
    voice = VOICES[seed % len(VOICES)]
    items = [(text, CLASS_PROSODY[label], voice) for _, label, _, text in DEMO]
    return [Example(id_, audio, text, LABELS.index(label), voice, cue)
            for (id_, label, cue, text), audio in zip(DEMO, render(items, backend), strict=True)]
