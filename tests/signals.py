"""Real test signals made on the fly: espeak-ng speech, harmonic music, noise, silence, clipping.

Shared by the filterbank tests and the pipeline tests (which write them as 16-bit wav files).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

KINDS = ("speech", "music", "noise", "pink", "silence", "clipped")

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the band keeps playing.",
    "A violin and a drum were heard across the crowded stadium at midnight.",
    "Please remember to close the window before the storm arrives tonight.",
    "Seven birds sang softly near the river as the boat drifted past.",
)


def have_espeak() -> bool:
    """Whether the espeak-ng speech synthesiser is on PATH."""
    return shutil.which("espeak-ng") is not None


def _speech(samples: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """espeak-ng sentences (voice speed and pitch drawn from rng), resampled to sr, tiled/cut."""
    if not have_espeak():
        raise RuntimeError("make_signal('speech') needs espeak-ng on PATH (apt install espeak-ng)")
    pieces, total = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        while total < samples:
            path = Path(tmp) / f"speech{len(pieces)}.wav"
            text = _SENTENCES[int(rng.integers(len(_SENTENCES)))]
            speed, pitch = int(rng.integers(140, 200)), int(rng.integers(30, 70))
            cmd = ["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(path), text]
            subprocess.run(cmd, check=True, capture_output=True)
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            audio = torch.from_numpy(audio[:, 0].copy())
            if rate != sr:
                audio = torchaudio.functional.resample(audio, rate, sr)
            pieces.append(audio.numpy())
            total += len(audio)
    return np.concatenate(pieces)[:samples]


def _music(samples: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Two voices of harmonic notes (partials up to Nyquist, 1/h amplitudes) with attack/decay."""
    t = np.arange(samples) / sr
    out = np.zeros(samples)
    note_len = int(0.25 * sr)
    scale = 220.0 * 2.0 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12.0)
    for voice in range(2):
        for start in range(0, samples, note_len):
            stop = min(start + note_len, samples)
            freq = scale[int(rng.integers(len(scale)))] * (voice + 1)
            local = t[start:stop] - t[start]
            envelope = (1.0 - np.exp(-local / 0.01)) * np.exp(-local / 0.12)
            partials = np.arange(1, int(sr / 2 / freq) + 1)
            phases = rng.uniform(0, 2 * np.pi, len(partials))
            tone = np.sin(2 * np.pi * freq * partials[:, None] * t[start:stop] + phases[:, None])
            out[start:stop] += envelope * (tone / partials[:, None]).sum(axis=0)
    return 0.5 * out / max(np.abs(out).max(), 1e-12)


def _pink(samples: int, rng: np.random.Generator) -> np.ndarray:
    """1/f-power noise: white noise shaped by 1/sqrt(f) in the frequency domain, RMS 0.1."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0
    shaped = np.fft.irfft(spectrum / np.sqrt(freqs), n=samples)
    return 0.1 * shaped / max(np.sqrt(np.mean(shaped**2)), 1e-12)


def make_signal(kind: str, seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A mono float32 signal in [-1, 1] of round(seconds * sr) samples.

    kind: speech (espeak-ng, needs it installed), music (harmonic notes with envelopes), noise
    (white Gaussian, std 0.1), pink (1/f noise, RMS 0.1), silence (all zeros), clipped (a sine
    chord at amplitude 3 clipped to [-1, 1]).
    """
    samples = int(round(seconds * sr))
    rng = np.random.default_rng(seed)
    if kind == "speech":
        x = _speech(samples, sr, rng)
    elif kind == "music":
        x = _music(samples, sr, rng)
    elif kind == "noise":
        x = 0.1 * rng.standard_normal(samples)
    elif kind == "pink":
        x = _pink(samples, rng)
    elif kind == "silence":
        x = np.zeros(samples)
    elif kind == "clipped":
        t = np.arange(samples) / sr
        base = rng.uniform(200.0, 500.0)
        x = 3.0 * (np.sin(2 * np.pi * base * t) + 0.3 * np.sin(2 * np.pi * 2.5 * base * t))
    else:
        raise ValueError(f"unknown signal kind {kind!r}; expected one of {KINDS}")
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def kaldi_fbank(wave: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """torchaudio's Kaldi log-mel filterbank with the spec's arguments, (frames, 128), of a mono
    waveform (1-D or (1, N); its mean already removed, as the spec removes it first): the
    reference the filterbank tests compare ours with."""
    return torchaudio.compliance.kaldi.fbank(
        wave.reshape(1, -1).cpu(), htk_compat=True, sample_frequency=sample_rate,
        use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
    )  # fmt: skip


def write_wav(path: str | Path, x: np.ndarray, sr: int, channels: int = 1) -> None:
    """Write mono `x` as 16-bit PCM wav with `channels` identical channels."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"write_wav takes a mono (N,) signal, got shape {x.shape}")
    data = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    sf.write(str(path), data, sr, subtype="PCM_16")


def pcm16_round_trip(x: np.ndarray, sr: int = 16000) -> np.ndarray:
    """`x` after writing it as a 16-bit PCM wav and reading it back as float32 (in memory)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(x, dtype=np.float32), sr, format="WAV", subtype="PCM_16")
    buffer.seek(0)
    return sf.read(buffer, dtype="float32")[0]
