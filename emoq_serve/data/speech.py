"""Text to speech with controllable prosody, for the synthetic emotion corpus.

Two renderers share one `Prosody`: espeak-ng (real phonetics, ~100 clips/s on two cores)
when installed, and a small numpy source-filter synthesizer otherwise, so the corpus and the
demo exist on any machine. Both map pitch, rate, loudness, word gaps and an exclamation
contour onto the signal; the synthetic corpus relies only on those controls, never on how
natural the result sounds. Output is mono float32 at 16 kHz quantised to the int16 grid, so a
clip read back from the on-disk cache is bit-identical to a freshly rendered one.
"""

from __future__ import annotations

import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from emoq_serve.audio import resample
from emoq_serve.config import SAMPLE_RATE

ESPEAK_RATE = 22_050
#: Speaker voices (espeak-ng variants of one male voice, so speakers differ in timbre but
#: share a pitch range and pitch stays an emotion cue rather than a gender cue).
VOICES = ("m1", "m2", "m3", "m4", "m5", "m6")
_SILENCE = 0.01  # trim threshold, relative to the clip's peak
_MAX_SECONDS = 4.0


@dataclass(frozen=True)
class Prosody:
    """espeak-ng's controls: pitch 0-99 (50 default), speed in words/min, amplitude 0-200,
    word gap in 10 ms units; `exclaim` renders the sentence with an exclamation contour.
    `tape` < 1 plays the result back slower, like a slowed tape: pitch and formants drop and
    the rate falls by the same factor (espeak-ng's pitch control barely goes below default)."""

    pitch: int = 50
    speed: int = 165
    amplitude: int = 100
    word_gap: int = 0
    exclaim: bool = False
    tape: float = 1.0


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _finish(x: np.ndarray, sr: int, tape: float) -> np.ndarray:
    """Trim silence, apply the tape factor, cap the length, resample, quantise to int16 steps."""
    loud = np.flatnonzero(np.abs(x) > _SILENCE * max(float(np.abs(x).max()), 1e-6))
    if loud.size:
        x = x[max(loud[0] - sr // 50, 0): loud[-1] + sr // 20]
    sr = round(sr * tape)  # reinterpreting the rate is what changes the playback speed
    x = np.clip(resample(x[: int(_MAX_SECONDS * sr)], sr, SAMPLE_RATE), -1.0, 32767 / 32768)
    return (np.round(x * 32768.0) / 32768.0).astype(np.float32)


def _espeak(text: str, prosody: Prosody, voice: str) -> np.ndarray:
    spoken = text.rstrip(".!?") + ("!" if prosody.exclaim else ".")
    cmd = ["espeak-ng", "--stdout", "-v", f"en-us+{voice}", "-p", str(prosody.pitch), "-s", str(prosody.speed),
           "-a", str(prosody.amplitude), "-g", str(prosody.word_gap), spoken]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    # espeak-ng streams a 44-byte WAV header with unknown sizes, then int16 at 22.05 kHz.
    return _finish(np.frombuffer(wav[44:], dtype="<i2").astype(np.float32) / 32768.0, ESPEAK_RATE, prosody.tape)


# Formants (Hz) of a few vowels; a syllable's vowel is picked by hashing its text.
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (440, 1020, 2240),
           (660, 1720, 2410), (300, 870, 2240))


def _resonate(x: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    """Second-order resonator (Klatt), unit gain at DC: one formant."""
    c = -np.exp(-2 * np.pi * bandwidth / sr)
    b = 2 * np.exp(-np.pi * bandwidth / sr) * np.cos(2 * np.pi * freq / sr)
    return lfilter([1 - b - c], [1, -b, -c], x)


def _syllables(word: str) -> int:
    groups, prev = 0, False
    for ch in word.lower():
        vowel = ch in "aeiouy"
        groups += vowel and not prev
        prev = vowel
    return max(groups, 1)


def _numpy_speech(text: str, prosody: Prosody, voice: str) -> np.ndarray:
    """Source-filter speech: a glottal pulse train along a pitch contour, three formants per
    syllable, a noise burst for the onset consonant and a raised-cosine loudness envelope."""
    sr = SAMPLE_RATE
    v = VOICES.index(voice) if voice in VOICES else 0
    base_f0 = 88.0 + 0.75 * prosody.pitch + 3.0 * v
    formant_scale = 1.0 + 0.03 * (v - len(VOICES) / 2)
    accent = 0.35 if prosody.exclaim else 0.15
    words = text.rstrip(".!?").replace(",", "").split()
    syl_seconds = 60.0 / prosody.speed / 1.8
    pieces, n_syl = [], sum(_syllables(w) for w in words)
    k = 0
    for w_i, word in enumerate(words):
        for s in range(_syllables(word)):
            progress = k / max(n_syl - 1, 1)
            f0 = base_f0 * (1.1 - 0.2 * progress) * (1 + accent * (s == 0))
            if prosody.exclaim and k == n_syl - 1:
                f0 *= 1 + accent
            n = int(syl_seconds * sr)
            f0_track = f0 * np.linspace(1.05, 0.95, n)
            phase = np.cumsum(f0_track / sr)
            source = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
            f1, f2, f3 = _VOWELS[zlib.crc32(f"{word}{s}".encode()) % len(_VOWELS)]
            vowel = sum(_resonate(source, f * formant_scale, bw, sr)
                        for f, bw in ((f1, 80), (f2, 100), (f3, 150)))
            onset = int(0.03 * sr)
            noise = np.random.default_rng(zlib.crc32(f"{word}{s}{v}".encode())).standard_normal(onset) * 0.05
            env = np.sin(np.linspace(0, np.pi, n)) ** 0.5
            pieces += [noise, vowel * env]
            k += 1
        gap = (0.03 + 0.01 * prosody.word_gap) * (w_i < len(words) - 1)
        pieces.append(np.zeros(int(gap * sr)))
    x = np.concatenate(pieces)
    x = x / max(float(np.abs(x).max()), 1e-9) * 0.4 * prosody.amplitude / 100
    return _finish(x.astype(np.float32), sr, prosody.tape)


def resolve_backend(backend: str = "auto") -> str:
    """`auto` picks espeak-ng when installed, else numpy; an explicit choice is checked."""
    if backend == "auto":
        return "espeak" if espeak_available() else "numpy"
    if backend not in ("espeak", "numpy"):
        raise ValueError(f"unknown speech backend {backend!r}; choose auto, espeak or numpy")
    if backend == "espeak" and not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); use backend='numpy'")
    return backend


def render(items: list[tuple[str, Prosody, str]], backend: str = "auto", workers: int = 4) -> list[np.ndarray]:
    """Speak (text, prosody, voice) items in parallel, in order."""
    fn = _espeak if resolve_backend(backend) == "espeak" else _numpy_speech
    with ThreadPoolExecutor(workers) as pool:  # subprocesses and lfilter release the GIL
        return list(pool.map(lambda item: fn(*item), items))
