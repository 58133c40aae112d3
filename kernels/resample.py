"""Band-limited resampling (windowed sinc, Hann window), for audio that is not at 16 kHz.

Why our own: DALI 2.4's ``fn.decoders.audio(sample_rate=...)`` and ``fn.audio_resample`` do not
low-pass when they downsample (measured: a 12 kHz tone in a 44.1 kHz file comes out of a 16 kHz
resampling at full amplitude, aliased to 4 kHz), which would silently corrupt the filterbank.
This is the same function as ``torchaudio.functional.resample`` with its defaults
(``sinc_interp_hann``, ``lowpass_filter_width=6``, ``rolloff=0.99``): a polyphase filter bank
applied as one strided convolution. Filters are built in float64 and applied in float32.
"""

from __future__ import annotations

import functools
import math

import torch

LOWPASS_WIDTH = 6  # zero crossings of the sinc on each side
ROLLOFF = 0.99  # cut-off as a fraction of the lower Nyquist frequency


@functools.lru_cache(maxsize=16)
def _filters(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """(new, 1, taps) polyphase filters for reduced rates orig -> new, and the half width."""
    cutoff = min(orig, new) * ROLLOFF  # in units of the reduced rates
    width = math.ceil(LOWPASS_WIDTH * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    # Output phase p sits at p / new input periods; each filter is the sinc centred there.
    t = taps[None, :] - torch.arange(new, dtype=torch.float64)[:, None] / new
    t = (t * cutoff).clamp(-LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = torch.cos(t * math.pi / (2 * LOWPASS_WIDTH)) ** 2
    arg = t * math.pi
    sinc = torch.where(arg == 0, torch.ones_like(arg), torch.sin(arg) / arg)
    return (sinc * window * (cutoff / orig)).unsqueeze(1), width


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample (..., N) float audio from ``orig_rate`` to ``new_rate`` Hz.

    Output length is ceil(N * new_rate / orig_rate). Equal rates return the input unchanged.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    filters, width = _filters(orig, new)
    shape = wave.shape
    x = wave.reshape(-1, 1, shape[-1]).float()
    x = torch.nn.functional.pad(x, (width, width + orig))
    y = torch.nn.functional.conv1d(x, filters.to(x.device, torch.float32), stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    out_len = math.ceil(new * shape[-1] / orig)
    return y[:, :out_len].reshape(*shape[:-1], out_len)
