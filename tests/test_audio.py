"""Audio decoding and resampling: the boundary every request and dataset clip crosses."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

from emoq_serve.audio import decode_float32, decode_pcm16, load_audio, resample, to_mono


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()])


def _sine(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


@pytest.mark.parametrize("sr_in", [8000, 22050, 44100, 48000])
def test_resample_keeps_frequency_and_length(sr_in: int) -> None:
    y = resample(_sine(440.0, sr_in), sr_in)
    assert y.dtype == np.float32
    assert abs(len(y) - 16000) <= 1
    assert abs(_peak_hz(y, 16000) - 440.0) < 2.0
    assert abs(np.abs(y[1000:-1000]).max() - 0.5) < 0.01


def test_resample_removes_content_above_new_nyquist() -> None:
    # 11 kHz cannot exist at 16 kHz; a naive resampler would fold it to 5 kHz.
    y = resample(_sine(11000.0, 48000), 48000)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 0.01


def test_resample_rejects_bad_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, np.float32), 0)


def test_decode_pcm16_scales_little_endian() -> None:
    data = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    np.testing.assert_array_equal(decode_pcm16(data), np.array([0, 0.5, -1, 32767 / 32768], np.float32))


def test_decode_pcm16_rejects_odd_bytes() -> None:
    with pytest.raises(ValueError, match="even number of bytes.*got 3 bytes"):
        decode_pcm16(b"\x00\x01\x02")


def test_decode_float32_roundtrip_and_errors() -> None:
    x = np.array([0.25, -0.5, 1.0], dtype="<f4")
    np.testing.assert_array_equal(decode_float32(x.tobytes()), x)
    with pytest.raises(ValueError, match="multiple of 4 bytes"):
        decode_float32(b"\x00" * 6)
    with pytest.raises(ValueError, match="2 non-finite"):
        decode_float32(np.array([0.1, np.nan, np.inf], dtype="<f4").tobytes())


def test_to_mono_averages_channels() -> None:
    x = np.stack([np.ones(4), np.zeros(4)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(to_mono(x), np.full(4, 0.5, np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_mono(np.zeros((2, 2, 2)))


def test_load_audio_stereo_44k_to_mono_16k(tmp_path) -> None:
    left, right = _sine(300.0, 44100), _sine(300.0, 44100)
    path = tmp_path / "a.flac"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - 16000) <= 1
    assert abs(_peak_hz(y, 16000) - 300.0) < 2.0


def test_load_audio_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_load_audio_mp4_needs_ffmpeg(tmp_path, monkeypatch) -> None:
    path = tmp_path / "dia0_utt0.mp4"
    path.write_bytes(b"not really an mp4")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs ffmpeg"):
        load_audio(path)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_load_audio_through_ffmpeg(tmp_path) -> None:
    import subprocess

    wav, m4a = tmp_path / "a.wav", tmp_path / "a.m4a"
    sf.write(wav, _sine(500.0, 48000), 48000)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), str(m4a)], check=True)
    y = load_audio(m4a)
    assert abs(len(y) - 16000) < 1600 and abs(_peak_hz(y, 16000) - 500.0) < 3.0


@pytest.mark.parametrize("sr_in", [8000, 44100, 48000])
def test_stream_resampler_is_chunking_invariant(sr_in: int) -> None:
    """Chunks of any size (1 sample, odd sizes, big ones) resample to exactly the whole clip's samples."""
    from emoq_serve.audio import StreamResampler

    x = (np.random.default_rng(sr_in).standard_normal(sr_in * 2) * 0.1).astype(np.float32)
    whole = resample(x, sr_in)
    rs, parts, i = StreamResampler(sr_in), [], 0
    for n in [1, 7, 1000, 333, 20011, 5000] * 3:
        parts.append(rs(x[i:i + n]))
        i += n
    parts.append(rs(x[i:], last=True))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_stream_resampler_passes_16k_through() -> None:
    from emoq_serve.audio import StreamResampler

    x = _sine(300.0, 16000, 0.1)
    rs = StreamResampler(16000)
    np.testing.assert_array_equal(np.concatenate([rs(x[:777]), rs(x[777:]), rs(x[:0], last=True)]), x)
