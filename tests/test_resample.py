"""``kernels.resample`` is torchaudio's default resampler, computed by our own code."""

import pytest
import torch
import torchaudio.functional as AF

from kernels.resample import resample


@pytest.mark.parametrize(
    "orig,new", [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000), (32000, 16000)]
)
def test_matches_torchaudio(orig, new):
    x = torch.randn(3, orig * 2 + 17, generator=torch.Generator().manual_seed(0))
    ours, ref = resample(x, orig, new), AF.resample(x, orig, new)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4


def test_equal_rates_and_bad_rates():
    x = torch.randn(100)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


def test_removes_content_above_the_new_nyquist():
    t = torch.arange(44100, dtype=torch.float64) / 44100
    tone = (0.5 * torch.sin(2 * torch.pi * 12000 * t)).float()
    out = resample(tone, 44100, 16000)
    assert out[1000:-1000].pow(2).mean().sqrt() < 1e-3
