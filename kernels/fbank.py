"""Kaldi-exact log-mel filterbank (EquiAV audio input): a torch reference and a Triton kernel.

The function is `torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000,
use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)` with its
remaining defaults: 400-sample frames every 160 samples with snip_edges (only whole frames), per
frame DC removal, pre-emphasis 0.97 (the first sample against itself), symmetric Hann window
0.5 - 0.5 cos(2 pi n / 399), zero-padding to 512, power spectrum, 128 triangular filters in the
mel domain (mel = 1127 ln(1 + f / 700)) between 20 Hz and 8 kHz over the first 256 FFT bins (the
Nyquist bin has zero weight), natural log floored at float32 epsilon. torchaudio is only the
reference in the tests; everything here is computed by our own code.

Two implementations of the same function, chosen by `fbank(..., backend="auto")`:
- `fbank_torch`: framing by `unfold`, `torch.fft.rfft` (pocketfft on CPU, cuFFT on CUDA) and a
  float64 mel product. Runs anywhere; on a GPU it launches about a dozen kernels and writes the
  framed, windowed and complex spectra to memory between them.
- `fbank_triton`: one fused Triton kernel per batch. It reads the waveform once per block of
  frames and keeps everything else in registers: framing, DC removal, pre-emphasis and window,
  the 512-point real DFT as two float32 dots against cos/sin matrices (only the 400 non-zero rows
  and the 256 weighted bins), power, the mel dot and the log. Its dots run in IEEE float32
  (`dot_precision="ieee"`, on the CUDA cores) or as three TF32 tensor-core products of each
  operand's TF32 part and remainder (`"tf32x3"`, ~2^-21 relative per product); plain TF32 would
  cost a mean log-mel error of 6e-4 to 2e-2 on the test clips (the spec allows 1e-4). "auto"
  picks by the batch's size on CUDA (`auto_backend`): this kernel with tf32x3 dots for small
  batches, torch's cuFFT path for large ones. Under `TRITON_INTERPRET=1`
  (set before this module is imported) it also runs on CPU tensors, which is how it is tested
  without a GPU (the interpreter's dots are NumPy's whatever the precision; `tf32x3`'s numbers
  are checked by emulation on the CPU and on a GPU by the `cuda` test).

Batches: `wave` is (B, N) float32, rows zero-padded to a common N; `lengths` (B,) gives each
row's valid sample count (None: all N). The result is `Fbank(feats, num_frames)`: `feats` is
(B, T, 128) with T = 1 + (N - 400) // 160 frames of the padded width (0 when N < 400), and
`num_frames[b] = 1 + (lengths[b] - 400) // 160` (0 when lengths[b] < 400). Frames at or beyond
`num_frames[b]` are exactly zero, which is also the spec's padding value after the log, so a
batch row equals the single-clip result followed by zero frames.

The data pipeline subtracts each waveform's mean before the filterbank (spec); that is not part
of Kaldi's fbank, so it lives in the separate helper `remove_mean`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch

from kernels import triton_interpreting
from kernels.transfer import to_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no Triton
    triton = None
    tl = None

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
N_FFT = 512  # frame length rounded up to a power of two
NUM_MEL_BINS = 128
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi's std::numeric_limits<float>::epsilon()

# Triton tile sizes: frames per program, samples per DFT step, DFT bins per step. Chosen so the
# register-resident accumulators stay small (32x64 re/im + 32x128 mel); not tuned on hardware.
_BLOCK_T = 32
_BLOCK_N = 16
_BLOCK_K = 64
_NUM_WARPS = 4
# The backends `fbank` takes, and the Triton kernel's dot precisions (see the module docstring).
BACKENDS = ("auto", "torch", "triton", "triton-tf32x3")
DOT_PRECISIONS = ("ieee", "tf32x3")
# "auto" on CUDA: cuFFT (fbank_torch) from this many samples per batch, the Triton kernel with
# tf32x3 dots below it. Measured on an H200 (bench/results/fbank-h200.json, 10-s clips, CUDA
# events): 16 clips 0.30 ms Triton tf32x3 / 0.36 IEEE / 0.65 cuFFT (cuFFT's ~dozen launches
# bound it: host 0.62 ms), 64 clips 1.13 / 1.36 / 0.83, 256 clips 4.34 / 5.23 / 3.00. The
# kernel's dense DFT grows with the samples (~0.018 ms per 10-s clip), cuFFT stays near its
# launch cost up to 64 clips: they cross near 40 clips of 10 s.
AUTO_CUFFT_MIN_SAMPLES = 40 * 160_000
# fbank_torch on a CPU: values per chunk of its padded-frame buffer (one clip of 1024 frames).
_CHUNK_VALUES = 1024 * N_FFT


class Fbank(NamedTuple):
    """Batched filterbank result: `feats` (B, T, 128) float32 and `num_frames` (B,) int64."""

    feats: torch.Tensor
    num_frames: torch.Tensor


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale, 1127 ln(1 + f / 700)."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def kaldi_mel_matrix(
    num_bins: int = NUM_MEL_BINS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    low_freq: float = LOW_FREQ,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Kaldi's triangular mel filters as a (n_fft // 2 + 1, num_bins) float32 matrix.

    Filters are equally spaced in mel between `low_freq` and `high_freq` (<= 0 means Nyquist plus
    that offset, as in Kaldi); filter i rises from edge i to its centre i + 1 and falls to edge
    i + 2. They cover FFT bins 0 .. n_fft // 2 - 1; the last row (the Nyquist bin) is zero, as in
    Kaldi. Built in float64, then rounded once to float32.
    """
    if num_bins < 4 or n_fft < 2 or n_fft % 2:
        raise ValueError(f"need num_bins >= 4 and an even n_fft, got {num_bins}, {n_fft}")
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(
            f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}"
        )
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    step = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + step * torch.arange(num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    bin_mel = _mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))
    rising = (bin_mel[:, None] - left) / (centre - left)
    falling = (right - bin_mel[:, None]) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    nyquist_row = torch.zeros(1, num_bins, dtype=torch.float64)
    return torch.cat([weights, nyquist_row]).to(torch.float32)


def hann_window(length: int = FRAME_LENGTH) -> torch.Tensor:
    """Symmetric Hann window 0.5 - 0.5 cos(2 pi n / (length - 1)), float32."""
    n = torch.arange(length, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (length - 1))).to(torch.float32)


def num_frames_for(lengths: torch.Tensor) -> torch.Tensor:
    """Whole 400-sample frames at a 160-sample shift in each length (snip edges), int64."""
    lengths = lengths.to(torch.int64)
    return torch.where(
        lengths >= FRAME_LENGTH,
        1 + (lengths - FRAME_LENGTH).clamp(min=0) // FRAME_SHIFT,
        torch.zeros_like(lengths),
    )


def remove_mean(wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract each waveform's mean over its valid samples; padding stays zero.

    `wave` is (N,) or (B, N) float; with `lengths` (B,), samples at or beyond a row's length are
    padding: they are left out of its mean and set to zero in the result.
    """
    if wave.dim() == 1:
        if lengths is not None:
            raise ValueError("lengths is only for (B, N) batches")
        return wave - wave.mean()
    if wave.dim() != 2:
        raise ValueError(f"wave must be (N,) or (B, N), got shape {tuple(wave.shape)}")
    if lengths is None:
        return wave - wave.mean(dim=1, keepdim=True)
    lengths = _check_lengths(wave, lengths)
    valid = torch.arange(wave.shape[1], device=wave.device) < lengths[:, None]
    total = torch.where(valid, wave, 0.0).sum(dim=1, keepdim=True)
    mean = total / lengths.clamp(min=1)[:, None].to(wave.dtype)
    return torch.where(valid, wave - mean, 0.0)


def _check_lengths(wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Validate (B,) integer lengths against a (B, N) wave; return them as int64 on its device."""
    if lengths.dim() != 1 or lengths.shape[0] != wave.shape[0]:
        raise ValueError(
            f"lengths must be ({wave.shape[0]},) for wave {tuple(wave.shape)}, "
            f"got {tuple(lengths.shape)}"
        )
    if lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    # Checked where the lengths live: host lengths (the loader's) cost a GPU no synchronisation.
    lengths = lengths.to(torch.int64)
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > wave.shape[1]):
        raise ValueError(f"lengths must lie in [0, {wave.shape[1]}], got {lengths.tolist()}")
    return to_device(lengths, wave.device)


def _prepare(wave: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Validate a batch; return its per-row frame counts and the padded frame count T."""
    if wave.dim() != 2:
        raise ValueError(f"wave must be (B, N), got shape {tuple(wave.shape)}")
    if wave.dtype != torch.float32:
        raise TypeError(f"wave must be float32, got {wave.dtype}")
    batch, width = wave.shape
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.int64, device=wave.device)
    else:
        lengths = _check_lengths(wave, lengths)
    total = 1 + (width - FRAME_LENGTH) // FRAME_SHIFT if width >= FRAME_LENGTH else 0
    return num_frames_for(lengths), total


def _zero_invalid_frames(feats: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Zero frames at or beyond each row's frame count (in place where the counts live on the
    host: a slice per short row, no device synchronisation)."""
    if not num_frames.is_cuda:
        for row, count in enumerate(num_frames.tolist()):
            feats[row, count:] = 0.0
        return feats
    frame = torch.arange(feats.shape[1], device=feats.device)
    return torch.where((frame < num_frames[:, None])[:, :, None], feats, 0.0)


@functools.lru_cache(maxsize=8)
def _window_on(device: torch.device) -> torch.Tensor:
    return hann_window().to(device)


@functools.lru_cache(maxsize=8)
def _mel_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return kaldi_mel_matrix().to(device=device, dtype=dtype)


def fbank_torch(wave: torch.Tensor, lengths: torch.Tensor | None = None) -> Fbank:
    """Kaldi log-mel fbank of a (B, N) float32 batch with torch ops (CPU or CUDA).

    On a GPU the mel product runs in float64, so neither TF32 nor autocast can change the
    result; on a CPU (no TF32) in float32.
    """
    num_frames, total = _prepare(wave, lengths)
    batch = wave.shape[0]
    if total == 0 or batch == 0:
        empty = wave.new_zeros(batch, total, NUM_MEL_BINS)
        return Fbank(empty, num_frames)
    with torch.autocast(wave.device.type, enabled=False):
        # Per frame, Kaldi computes w[n] * ((x[n] - m) - 0.97 (x[n-1] - m)) with m the frame's
        # mean and x[-1] = x[0]. That equals w[n] * (e[n] - 0.03 m) with e the pre-emphasis of
        # the whole waveform, e[j] = x[j] - 0.97 x[j-1], for n >= 1; at n = 0 the symmetric Hann
        # window is zero, so the frame's own first sample never matters. Pre-emphasising the
        # waveform once and writing the windowed frames straight into a zero-padded FFT buffer
        # makes two passes over the (B, T, 400) frames instead of eight.
        means = wave.unfold(1, FRAME_LENGTH, FRAME_SHIFT).mean(dim=2, keepdim=True)
        emph = torch.empty_like(wave)
        torch.sub(wave[:, 1:], wave[:, :-1], alpha=PREEMPHASIS, out=emph[:, 1:])
        emph[:, 0] = 0.0  # only ever multiplied by the window's zero
        frames = emph.unfold(1, FRAME_LENGTH, FRAME_SHIFT)  # (B, T, 400), a strided view
        window = _window_on(wave.device)
        cpu = wave.device.type == "cpu"
        # CPUs have no TF32: a float32 product is IEEE float32 (and ~3x faster than float64).
        mel = _mel_on(wave.device, torch.float32 if cpu else torch.float64)[: N_FFT // 2]
        feats = wave.new_empty(batch, total, NUM_MEL_BINS)
        # On a CPU about one clip (_CHUNK_VALUES) at a time, through buffers reused from chunk
        # to chunk: the intermediates (padded frames, spectrum, power: ~100 MB for a batch of 16
        # ten-second clips at once) stay in cache and little fresh memory is faulted in per
        # batch (CPU: ~100 -> ~65 ms per batch of 16).
        rows = max(1, _CHUNK_VALUES // (total * N_FFT)) if cpu else batch
        padded = wave.new_zeros(min(rows, batch), total, N_FFT)
        power = wave.new_empty(padded.shape[:2] + (N_FFT // 2,))
        for a in range(0, batch, rows):
            n = min(rows, batch - a)
            windowed = padded[:n, :, :FRAME_LENGTH]
            torch.sub(frames[a : a + n], means[a : a + n], alpha=1.0 - PREEMPHASIS, out=windowed)
            windowed.mul_(window)
            spectrum = torch.fft.rfft(padded[:n])  # (rfft's out= only copies into it)
            # The Nyquist bin has zero mel weight: leave it out of the power and the product.
            parts = torch.view_as_real(spectrum)[..., : N_FFT // 2, :]
            torch.mul(parts[..., 0], parts[..., 0], out=power[:n])
            power[:n].addcmul_(parts[..., 1], parts[..., 1])
            if cpu:
                torch.matmul(power[:n], mel, out=feats[a : a + n])
            else:
                feats[a : a + n] = torch.matmul(power[:n].double(), mel).float()
        feats.clamp_(min=LOG_FLOOR).log_()
    return Fbank(_zero_invalid_frames(feats, num_frames), num_frames)


@functools.lru_cache(maxsize=8)
def _triton_constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Read-only kernel inputs per device: DFT cos/sin (400, 256), window (400,), mel (256, 128).

    Cached because they cost more kernel launches to build than the filterbank itself.
    """
    n = torch.arange(FRAME_LENGTH, dtype=torch.int64)[:, None]
    k = torch.arange(N_FFT // 2, dtype=torch.int64)[None, :]
    # Reduce n * k modulo N_FFT in integers so the angle is exact before the float64 cos/sin.
    angle = (2.0 * math.pi / N_FFT) * ((n * k) % N_FFT).to(torch.float64)
    cos = torch.cos(angle).to(torch.float32)
    sin = torch.sin(angle).to(torch.float32)  # the sign of the imaginary part is irrelevant
    mel = kaldi_mel_matrix()[: N_FFT // 2]  # the Nyquist row has zero weight: skip it
    return tuple(t.contiguous().to(device) for t in (cos, sin, hann_window(), mel))


if triton is not None:

    @triton.jit
    def _fbank_kernel(
        wave_ptr,
        num_frames_ptr,
        cos_ptr,
        sin_ptr,
        window_ptr,
        mel_ptr,
        out_ptr,
        wave_stride,
        total_frames,
        out_stride_b,
        out_stride_t,
        FRAME: tl.constexpr,
        SHIFT: tl.constexpr,
        NUM_BINS: tl.constexpr,
        NUM_MEL: tl.constexpr,
        PREEMPH: tl.constexpr,
        FLOOR: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT: tl.constexpr,
    ):
        """One program: BLOCK_T consecutive frames of one batch row -> (BLOCK_T, NUM_MEL)."""
        row = tl.program_id(0)
        frame = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = frame < tl.load(num_frames_ptr + row)
        starts = wave_ptr + row.to(tl.int64) * wave_stride + frame * SHIFT
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, NUM_MEL)

        # Frame means (DC offset).
        partial = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for n0 in range(0, FRAME, BLOCK_N):
            n = n0 + offs_n
            mask = valid[:, None] & (n < FRAME)[None, :]
            partial += tl.load(starts[:, None] + n[None, :], mask=mask, other=0.0)
        mean = tl.sum(partial, axis=1) / FRAME

        energies = tl.zeros([BLOCK_T, NUM_MEL], dtype=tl.float32)
        for k0 in range(0, NUM_BINS, BLOCK_K):
            real = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            imag = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            for n0 in range(0, FRAME, BLOCK_N):
                n = n0 + offs_n
                n_ok = n < FRAME
                mask = valid[:, None] & n_ok[None, :]
                # Pre-emphasis needs sample n - 1 of the DC-free frame; sample 0 pairs with itself.
                n_prev = tl.maximum(n - 1, 0)
                x = tl.load(starts[:, None] + n[None, :], mask=mask, other=0.0) - mean[:, None]
                x_prev = tl.load(starts[:, None] + n_prev[None, :], mask=mask, other=0.0)
                x_prev = x_prev - mean[:, None]
                window = tl.load(window_ptr + n, mask=n_ok, other=0.0)
                y = tl.where(mask, (x - PREEMPH * x_prev) * window[None, :], 0.0)
                basis = n[:, None] * NUM_BINS + (k0 + offs_k)[None, :]
                cos = tl.load(cos_ptr + basis, mask=n_ok[:, None], other=0.0)
                sin = tl.load(sin_ptr + basis, mask=n_ok[:, None], other=0.0)
                real = tl.dot(y, cos, real, input_precision=DOT)
                imag = tl.dot(y, sin, imag, input_precision=DOT)
            power = real * real + imag * imag
            weights = tl.load(mel_ptr + (k0 + offs_k)[:, None] * NUM_MEL + offs_m[None, :])
            energies = tl.dot(power, weights, energies, input_precision=DOT)

        feats = tl.where(valid[:, None], tl.log(tl.maximum(energies, FLOOR)), 0.0)
        out = out_ptr + row.to(tl.int64) * out_stride_b + frame[:, None] * out_stride_t
        tl.store(out + offs_m[None, :], feats, mask=(frame < total_frames)[:, None])


def fbank_triton(
    wave: torch.Tensor, lengths: torch.Tensor | None = None, dot_precision: str = "ieee"
) -> Fbank:
    """Kaldi log-mel fbank of a (B, N) float32 batch with the fused Triton kernel, its dots in
    `dot_precision` ("ieee" or "tf32x3", see the module docstring).

    Needs CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before import.
    """
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
    if triton is None:
        raise RuntimeError("fbank_triton needs triton, which is not importable")
    if not wave.is_cuda and not triton_interpreting():
        raise ValueError(
            f"fbank_triton needs a CUDA tensor (or TRITON_INTERPRET=1), got {wave.device}"
        )
    num_frames, total = _prepare(wave, lengths)
    batch = wave.shape[0]
    feats = wave.new_empty(batch, total, NUM_MEL_BINS)
    if total == 0 or batch == 0:
        return Fbank(feats, num_frames)
    wave = wave.contiguous()
    cos, sin, window, mel = _triton_constants(wave.device)
    grid = (batch, triton.cdiv(total, _BLOCK_T))
    device_guard = torch.cuda.device(wave.device) if wave.is_cuda else contextlib.nullcontext()
    with device_guard:
        _fbank_kernel[grid](
            wave,
            num_frames.to(torch.int32),
            cos,
            sin,
            window,
            mel,
            feats,
            wave.stride(0),
            total,
            feats.stride(0),
            feats.stride(1),
            FRAME=FRAME_LENGTH,
            SHIFT=FRAME_SHIFT,
            NUM_BINS=N_FFT // 2,
            NUM_MEL=NUM_MEL_BINS,
            PREEMPH=PREEMPHASIS,
            FLOOR=LOG_FLOOR,
            BLOCK_T=_BLOCK_T,
            BLOCK_N=_BLOCK_N,
            BLOCK_K=_BLOCK_K,
            DOT=dot_precision,
            num_warps=_NUM_WARPS,
        )
    return Fbank(feats, num_frames)


def auto_backend(wave: torch.Tensor, cuda: bool | None = None) -> str:
    """The backend "auto" runs for ``wave``: torch's on a CPU (or without Triton); on CUDA the
    Triton kernel with tf32x3 dots below `AUTO_CUFFT_MIN_SAMPLES` samples, cuFFT from there.
    ``cuda``: decide as if ``wave`` were (True) or were not (False) on CUDA (None: where it is)."""
    on_cuda = wave.is_cuda if cuda is None else cuda
    if not on_cuda or triton is None:
        return "torch"
    return "torch" if wave.numel() >= AUTO_CUFFT_MIN_SAMPLES else "triton-tf32x3"


def fbank(wave: torch.Tensor, lengths: torch.Tensor | None = None, backend: str = "auto") -> Fbank:
    """Kaldi log-mel fbank of a (B, N) float32 batch; see the module docstring for the layout.

    backend: "auto" (`auto_backend`: the fastest measured for the batch's size and device),
    "torch" (on a GPU: cuFFT), "triton" (IEEE float32 dots) or "triton-tf32x3" (its dots as
    three TF32 tensor-core products; `BACKENDS`).
    """
    if backend == "auto":
        backend = auto_backend(wave)
    if backend == "torch":
        return fbank_torch(wave, lengths)
    if backend == "triton":
        return fbank_triton(wave, lengths)
    if backend == "triton-tf32x3":
        return fbank_triton(wave, lengths, dot_precision="tf32x3")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def fbank_1d(wave: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Kaldi log-mel fbank of one (N,) float32 clip: (T, 128), T = 0 when N < 400."""
    if wave.dim() != 1:
        raise ValueError(f"fbank_1d takes one (N,) clip, got shape {tuple(wave.shape)}")
    return fbank(wave[None], backend=backend).feats[0]
