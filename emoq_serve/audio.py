"""Audio in: files and wire bytes to mono float32 at 16 kHz, the one format the model sees.

Every path into the model (dataset readers, the gRPC server, the CLI client) goes through
these functions so that decoding, down-mixing and resampling happen exactly one way. Errors
are `ValueError` with a message a caller can act on: the server maps them to INVALID_ARGUMENT
and shows the text to the client.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from emoq_serve.config import SAMPLE_RATE

#: Extensions libsndfile decodes itself; anything else (mp4, m4a, mp3 ...) goes through ffmpeg.
_SOUNDFILE_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif"}


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of a [samples, channels] array; 1-D input passes through."""
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"audio must be 1-D or [samples, channels]; got shape {x.shape}")
    return x.mean(axis=1)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (HQ); naive interpolation would alias into the model."""
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive; got {sr_in} Hz -> {sr_out} Hz")
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out or x.size == 0:
        return x.copy()
    return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


class StreamResampler:
    """`resample` for audio that arrives in pieces: soxr's stream resampler keeps the filter state
    between chunks, so the concatenated output equals `resample` of the whole clip sample for
    sample, however the input was chunked (resampling each chunk alone would click at every
    boundary and drift in length)."""

    def __init__(self, sr_in: int, sr_out: int = SAMPLE_RATE) -> None:
        if sr_in <= 0 or sr_out <= 0:
            raise ValueError(f"sample rates must be positive; got {sr_in} Hz -> {sr_out} Hz")
        self._stream = None if sr_in == sr_out else soxr.ResampleStream(sr_in, sr_out, 1, dtype="float32", quality="HQ")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        """The output samples now determined by the input so far; `last=True` flushes the tail."""
        x = np.asarray(x, dtype=np.float32)
        if self._stream is None:
            return x.copy()
        return np.asarray(self._stream.resample_chunk(x, last=last), dtype=np.float32)


def _check_finite(x: np.ndarray, what: str) -> np.ndarray:
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"{what} contains {bad} non-finite samples (NaN/Inf); send finite values in [-1, 1]")
    return x


def partial_sample_error(encoding: str, num_bytes: int) -> ValueError:
    """The error for audio whose byte count is not a whole number of samples."""
    rule = "an even number of bytes (2 per sample)" if encoding == "LINEAR16" else "a multiple of 4 bytes (4 per sample)"
    return ValueError(
        f"{encoding} audio must have {rule}; got {num_bytes} bytes. "
        f"Check that the encoding is {encoding} and that chunks were not split mid-sample."
    )


def decode_pcm16(data: bytes) -> np.ndarray:
    """LINEAR16 wire bytes (little-endian int16) to float32 in [-1, 1)."""
    if len(data) % 2:
        raise partial_sample_error("LINEAR16", len(data))
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def decode_float32(data: bytes) -> np.ndarray:
    """FLOAT32 wire bytes (little-endian IEEE 754) to float32, rejecting NaN/Inf."""
    if len(data) % 4:
        raise partial_sample_error("FLOAT32", len(data))
    return _check_finite(np.frombuffer(data, dtype="<f4").astype(np.float32), "FLOAT32 audio")


def _ffmpeg_decode(path: Path) -> np.ndarray:
    """Decode any container ffmpeg knows (MELD ships mp4) straight to mono 16 kHz float32."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError(
            f"cannot decode {path}: {path.suffix or 'this format'} needs ffmpeg, which is not installed "
            "(apt-get install ffmpeg), or convert the file to wav/flac first"
        )
    cmd = [ffmpeg, "-nostdin", "-loglevel", "error", "-i", str(path), "-vn", "-ac", "1",
           "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ValueError(f"ffmpeg could not decode {path}: {proc.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(proc.stdout, dtype="<f4").copy()


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file as mono float32 at 16 kHz (soundfile, or ffmpeg for other containers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    if path.suffix.lower() not in _SOUNDFILE_EXTENSIONS:
        return _ffmpeg_decode(path)
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(to_mono(x), sr)
