"""The audio half of the data path on real wav files: DALI decode/downmix/resample, pad/cut, fbank.

References: soundfile for reading, ``torchaudio.functional.resample`` and
``torchaudio.compliance.kaldi.fbank`` (the spec's arguments) for the numbers.
"""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from nvidia.dali import fn, pipeline_def

from dali_pipelines import audio
from dali_pipelines.fbank import file_fbank
from dali_pipelines.sources import read_wav
from tests.signals import have_espeak, kaldi_fbank, make_signal, write_wav


def reference_fbank(path) -> np.ndarray:
    """The paper's audio steps with torchaudio: load, (downmix, resample), mean, Kaldi fbank."""
    x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    w = torch.from_numpy(x.T.copy()).mean(0, keepdim=True)
    if sr != 16000:
        w = AF.resample(w, sr, 16000)
    w = w - w.mean()
    return kaldi_fbank(w).numpy()


def run_waveform_stage(paths, target_frames=audio.TARGET_FRAMES):
    datas = [read_wav(str(p)) for p in paths]

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def pipe():
        wav = fn.external_source(source=lambda: datas, batch=True)
        return audio.waveform(wav, target_frames)

    p = pipe()
    p.build()
    wave, length = (np.array(t.as_tensor()) for t in p.run())
    return wave, length.reshape(-1)


KINDS = ["music", "noise", "pink", "silence", "clipped"] + (["speech"] if have_espeak() else [])


@pytest.mark.parametrize("kind", KINDS)
def test_fbank_cli_function_matches_torchaudio_at_16k(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    write_wav(path, make_signal(kind, 4.0, 16000, seed=1), 16000)
    ours, ref = file_fbank(str(path)), reference_fbank(path)
    assert ours.shape == ref.shape == (398, 128)
    assert np.isfinite(ours).all()
    diff = np.abs(ours - ref)
    assert diff.mean() <= 1e-4
    assert np.percentile(diff, 99.9) <= 1e-2


@pytest.mark.parametrize("samples", [16001, 401, 400, 7777])
def test_odd_and_short_lengths(tmp_path, samples):
    path = tmp_path / "odd.wav"
    write_wav(path, make_signal("music", samples / 16000, 16000, seed=2)[:samples], 16000)
    ours, ref = file_fbank(str(path)), reference_fbank(path)
    assert ours.shape == ref.shape == (1 + (samples - 400) // 160, 128)
    assert np.abs(ours - ref).mean() <= 1e-4


def test_shorter_than_one_frame_gives_no_frames(tmp_path):
    path = tmp_path / "tiny.wav"
    write_wav(path, make_signal("noise", 0.01, 16000), 16000)
    assert file_fbank(str(path)).shape == (0, 128)


def test_waveform_stage_pads_and_cuts_after_removing_the_whole_file_mean(tmp_path):
    long_path, short_path = tmp_path / "long.wav", tmp_path / "short.wav"
    write_wav(long_path, make_signal("music", 12.0, 16000) + 0.1, 16000)  # DC offset on purpose
    write_wav(short_path, make_signal("noise", 3.0, 16000) - 0.05, 16000)
    wave, length = run_waveform_stage([long_path, short_path])
    n = audio.samples_for_frames(1024)
    assert wave.shape == (2, n) and n == 164080
    np.testing.assert_array_equal(length, [n, 48000])
    for row, path, valid in zip(wave, [long_path, short_path], length, strict=True):
        x = soundfile.read(path, dtype="float32")[0]
        expected = (x - x.mean())[:valid]
        np.testing.assert_allclose(row[:valid], expected, atol=2e-6)
        assert not row[valid:].any()


def test_features_pad_and_normalise(tmp_path):
    path = tmp_path / "three.wav"
    write_wav(path, make_signal("music", 3.0, 16000, seed=4), 16000)
    wave, length = run_waveform_stage([path])
    feats = audio.features(torch.from_numpy(wave), torch.from_numpy(length), -4.346, 4.332)
    assert feats.shape == (1, 1024, 128) and feats.dtype == torch.float32
    ref = reference_fbank(path)
    padded = np.zeros((1024, 128), np.float32)
    padded[: len(ref)] = ref  # the spec pads with zeros after the log, then normalises
    np.testing.assert_allclose(feats[0].numpy(), (padded + 4.346) / 4.332, atol=2e-3)


def band_limited(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Tones below 6 kHz (and the source's band): content both resamplers must keep unchanged."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    freqs = rng.uniform(80, min(6000, 0.4 * sr), size=12)
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.28)) for f in freqs)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize("sr,channels", [(44100, 2), (22050, 1), (48000, 1), (8000, 1)])
def test_resample_and_downmix_match_torchaudio(tmp_path, sr, channels):
    path = tmp_path / "in.wav"
    x = band_limited(sr, 2.0)
    data = np.stack([x, 0.5 * x], 1) if channels == 2 else x
    soundfile.write(path, data, sr, subtype="FLOAT")
    wave, length = run_waveform_stage([path], target_frames=400)
    ref = AF.resample(torch.from_numpy(data.reshape(len(x), -1).mean(1)), sr, 16000).numpy()
    ref = ref - ref.mean()
    n = int(length[0])
    assert abs(n - len(ref)) <= 1
    m = min(n, len(ref))
    # Stated tolerance: the same windowed-sinc filters, built in float64 by both, applied in
    # float32: 1e-4. A wrong rate, a missing low-pass or a missing downmix is off by O(0.1).
    err = np.abs(wave[0, :m] - ref[:m])
    assert err.max() < 1e-4, err.max()


@pytest.mark.parametrize("sr", [44100, 48000, 22050])
def test_resampled_broadband_fbank_matches_torchaudio(tmp_path, sr):
    """Broadband noise above 8 kHz must be filtered out, not aliased into the mel bands."""
    path = tmp_path / "noise.wav"
    write_wav(path, make_signal("noise", 3.0, sr, seed=5) * 0.3, sr, channels=2)
    ours, ref = file_fbank(str(path)), reference_fbank(path)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    assert diff.mean() <= 1e-3 and np.percentile(diff, 99.9) <= 1e-1, diff.mean()


def test_high_tone_is_removed_not_aliased(tmp_path):
    """DALI's own resampler turns a 12 kHz tone at 44.1 kHz into a 4 kHz tone; ours removes it."""
    sr = 44100
    t = np.arange(sr) / sr
    path = tmp_path / "tone.wav"
    soundfile.write(path, (0.5 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32), sr)
    wave, length = run_waveform_stage([path], target_frames=90)
    assert np.sqrt(np.mean(wave[0, 1000 : int(length[0]) - 1000] ** 2)) < 1e-3


def test_fbank_command_line_writes_npy(tmp_path):
    wav, out = tmp_path / "in.wav", tmp_path / "out.npy"
    write_wav(wav, make_signal("music", 1.0, 16000), 16000)
    subprocess.run(
        [sys.executable, "-m", "dali_pipelines.fbank", str(wav), str(out)],
        check=True,
        capture_output=True,
    )
    saved = np.load(out)
    assert saved.dtype == np.float32 and saved.shape == (98, 128)
    np.testing.assert_allclose(saved, reference_fbank(wav), atol=1e-2)


def test_fbank_command_line_names_a_broken_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    r = subprocess.run(
        [sys.executable, "-m", "dali_pipelines.fbank", str(bad), str(tmp_path / "o.npy")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "broken.wav" in r.stderr


def test_fbank_backend_for_names_what_auto_runs():
    """Results record the filterbank that ran: "auto" resolved for the batch's size on its device
    (10.24-s rows: 64 of them are past kernels.fbank.AUTO_CUFFT_MIN_SAMPLES, 16 are not)."""
    from kernels import fbank as KF

    assert audio.fbank_backend_for("auto", 64, 1024, "cpu") == "torch"
    assert audio.fbank_backend_for("triton", 64, 1024, "cpu") == "triton"  # named: as named
    if KF.triton is not None:
        assert audio.fbank_backend_for("auto", 64, 1024, "cuda") == "torch"  # cuFFT
        assert audio.fbank_backend_for("auto", 16, 1024, "cuda") == "triton-tf32x3"
