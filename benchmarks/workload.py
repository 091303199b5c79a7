"""The benchmark workload: a fixed, seeded set of utterances shaped like conversational speech.

Why a length distribution and not one clip length: the encoders' cost grows with audio length
(HuBERT attention is quadratic in frames) and the batcher buckets by length, so a constant-length
workload would flatter batching. MELD/IEMOCAP utterance durations are right-skewed with a median
near 3 s and a long tail; a log-normal clipped to [1, 10] s reproduces that shape. Everything is
drawn from one `numpy` generator, so the same seed gives the same bytes for every engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.speech import VOICES, render
from emoq_serve.data.synthetic import CLASS_PROSODY

#: Conversational lines (MELD/IEMOCAP-like register); transcripts are cut from their words.
_LINES = (
    "oh my god you did not just say that to her face",
    "i told you a hundred times i am not going back there",
    "well that is just great now we are going to be late again",
    "no no no listen to me this is important",
    "i am so sorry i did not mean it like that",
    "are you serious that is the best news i have heard all week",
    "could you please pass me the coffee",
    "i do not know what to tell you anymore",
    "we should probably get going before it starts raining",
    "you know what forget it just forget i said anything",
    "hey how was your day at work",
    "she said she would call me back but she never did",
)

def conversational_lines() -> list[str]:
    """The lines the workload's transcripts are cut from (also the benchmark LLM tokenizer's corpus)."""
    return list(_LINES)


#: Silence between two phrases of one utterance.
PAUSE_SECONDS = 0.15


@dataclass(frozen=True)
class WorkloadConfig:
    """Size, seed and the length distribution (log-normal with this median and shape, clipped)."""

    num_utterances: int = 64
    seed: int = 0
    min_seconds: float = 1.0
    max_seconds: float = 10.0
    median_seconds: float = 3.0
    sigma: float = 0.6
    speech_backend: str = "auto"  # espeak-ng when installed, else the numpy synthesizer


@dataclass(frozen=True)
class BenchRequest:
    """One utterance to send: mono float32 audio at 16 kHz plus what was said."""

    index: int
    audio: np.ndarray
    transcript: str
    speaker: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def sample_durations(cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Clip lengths in seconds: log-normal(median, sigma) clipped to [min, max]."""
    raw = rng.lognormal(mean=np.log(cfg.median_seconds), sigma=cfg.sigma, size=cfg.num_utterances)
    return np.clip(raw, cfg.min_seconds, cfg.max_seconds)


def render_phrases(rng: np.random.Generator, backend: str) -> list[tuple[str, np.ndarray]]:
    """Every conversational line spoken once, by a random voice with a random class prosody.

    Uses the synthetic corpus' speech renderer (espeak-ng when installed, numpy otherwise), so
    the audio has speech-like level, spectrum and pauses: content does not change the model's
    compute, but silence or white noise could take different numeric paths.
    """
    prosodies = list(CLASS_PROSODY.values())
    items = [(line, prosodies[int(rng.integers(len(prosodies)))], VOICES[int(rng.integers(len(VOICES)))])
             for line in _LINES]
    return list(zip(_LINES, render(items, backend=backend)))


def utterance(seconds: float, phrases: list[tuple[str, np.ndarray]], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Audio of exactly `seconds`: random phrases joined by short pauses, cut to length; the
    transcript keeps the words of the spoken part (at least one)."""
    target = int(round(seconds * SAMPLE_RATE))
    pause = np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), dtype=np.float32)
    pieces: list[np.ndarray] = []
    words: list[str] = []
    length = 0
    while length < target:
        text, audio = phrases[int(rng.integers(len(phrases)))]
        kept = min(len(audio), target - length)
        spoken = text.split()
        words += spoken[: max(1, round(len(spoken) * kept / len(audio)))]
        pieces += [audio[:kept], pause]
        length += kept + len(pause)
    return np.concatenate(pieces)[:target], " ".join(words)


def make_workload(cfg: WorkloadConfig) -> list[BenchRequest]:
    """The seeded workload; identical for identical configs."""
    rng = np.random.default_rng(cfg.seed)
    phrases = render_phrases(rng, cfg.speech_backend)
    speakers = ("Rachel", "Ross", "Monica", "Chandler", "Joey", "Phoebe")
    requests = []
    for i, seconds in enumerate(sample_durations(cfg, rng)):
        audio, transcript = utterance(float(seconds), phrases, rng)
        requests.append(BenchRequest(index=i, audio=audio, transcript=transcript,
                                     speaker=speakers[int(rng.integers(len(speakers)))]))
    return requests
