"""Audio: wav decode, downmix, resample, mean removal and pad/cut in DALI; the filterbank stage.

Split in two stages on the same device:

1. In the DALI pipeline (``waveform``): decode the wav bytes and downmix to mono
   (``fn.decoders.audio``; the source has already resampled files of another rate with
   ``kernels.resample``, since DALI's resampler aliases), subtract the mean over the whole
   file, then cut or zero-pad to exactly the samples that 1024 Kaldi frames read
   (400 + 1023 * 160). The valid length travels with it, because the filterbank of a short clip
   must not see the padding.
2. Right after the DALI iterator (``features``): the Kaldi-exact filterbank of ``kernels.fbank``,
   zero frames up to 1024 (the spec pads after the log), then the dataset's normalisation.

Why the filterbank runs after the iterator rather than inside DALI (a python operator or a
plugin): DALI's own ``spectrogram``/``mel_filter_bank`` do not reproduce Kaldi (MEASURED.md), a
python operator on the GPU would synchronise and hold the GIL in DALI's threads, and a custom C++
plugin buys nothing over one fused Triton launch (or cuFFT's few) on the batch that is already
on the training device: 0.3 ms per 16 ten-second clips on an H200 (bench/results/fbank-h200.json),
and one implementation of the function for CPU and GPU. Augmentations defined on the filterbank
follow it in the same stage.
"""

from __future__ import annotations

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from kernels.fbank import FRAME_LENGTH, FRAME_SHIFT, auto_backend, fbank

SAMPLE_RATE = 16000
TARGET_FRAMES = 1024


def samples_for_frames(frames: int = TARGET_FRAMES) -> int:
    """Waveform samples that exactly ``frames`` Kaldi frames read (snip-edges framing)."""
    return FRAME_LENGTH + (frames - 1) * FRAME_SHIFT


def fbank_backend_for(
    backend: str, batch_size: int, target_frames: int, device: torch.device | str
) -> str:
    """The filterbank backend the device stage runs for batches of ``batch_size`` clips on
    ``device``: ``backend`` itself, or the one "auto" picks for that batch (results record it:
    "auto" alone does not say which ran)."""
    if backend != "auto":
        return backend
    wave = torch.empty(batch_size, samples_for_frames(target_frames), device="meta")
    return auto_backend(wave, cuda=torch.device(device).type == "cuda")


def _decode(wav_bytes: DataNode) -> DataNode:
    """Mono float waveform of 16 kHz wav bytes, its mean removed.

    The input must already be at 16 kHz: DALI's resampler does not low-pass (see
    ``kernels.resample``), so ``sources.read_wav`` resamples other rates before the pipeline.
    """
    audio, _rate = fn.decoders.audio(wav_bytes, downmix=True, dtype=types.FLOAT)
    return audio - fn.reductions.mean(audio)


def _pad_cut(audio: DataNode, target_frames: int) -> tuple[DataNode, DataNode]:
    max_samples = samples_for_frames(target_frames)
    length = dmath.min(audio.shape(dtype=types.INT64), max_samples)
    audio = fn.slice(
        audio, start=[0], shape=[max_samples], axes=[0], out_of_bounds_policy="pad", fill_values=0.0
    )
    return audio, length


def waveform(wav_bytes: DataNode, target_frames: int = TARGET_FRAMES) -> tuple[DataNode, DataNode]:
    """DALI stage: (mono float waveform, mean removed, cut/padded; its valid length).

    The waveform's mean is taken over the whole file before cutting, as the paper's loader does.
    """
    return _pad_cut(_decode(wav_bytes), target_frames)


def mixed_waveform(
    wav_bytes: DataNode, partner_bytes: DataNode, lam: DataNode, target_frames: int = TARGET_FRAMES
) -> tuple[DataNode, DataNode]:
    """Finetuning mixup before the filterbank, as the paper's loader mixes.

    Both waveforms lose their mean, the partner is cut or zero-padded to the first one's length,
    ``lam * first + (1 - lam) * partner`` loses its mean again, then pad/cut as ``waveform``.
    """
    first, partner = _decode(wav_bytes), _decode(partner_bytes)
    length = first.shape(dtype=types.INT32)
    partner = fn.slice(
        partner, start=[0], shape=length, axes=[0], out_of_bounds_policy="pad", fill_values=0.0
    )
    mixed = first * lam + partner * (1.0 - lam)
    return _pad_cut(mixed - fn.reductions.mean(mixed), target_frames)


def normalized_zero(mean: float, std: float) -> float:
    """What a log-mel value of 0 becomes under ``features``' normalisation (in float32, as it
    computes): the padding's value, and the fill of finetuning's SpecAugment bands, which the
    original's recipe (CAV-MAE's) masks before the normalisation."""
    return float((torch.zeros((), dtype=torch.float32) - mean) / std)


def features(
    wave: torch.Tensor,
    lengths: torch.Tensor,
    mean: float,
    std: float,
    target_frames: int = TARGET_FRAMES,
    backend: str = "auto",
) -> torch.Tensor:
    """Device stage: normalised Kaldi log-mel filterbank, (B, target_frames, 128) float32.

    ``wave`` is the DALI stage's output (B, N); rows are zero beyond their frame count, as the
    spec pads after the log, and the padding is normalised like the rest (as the paper does).
    ``backend``: the filterbank's (``kernels.fbank.fbank``; data.fbank_backend).
    """
    feats = fbank(wave.float(), lengths.reshape(-1), backend=backend).feats
    t = feats.shape[1]
    if t < target_frames:
        feats = torch.nn.functional.pad(feats, (0, 0, 0, target_frames - t))
    elif t > target_frames:
        feats = feats[:, :target_frames]
    return (feats - mean) / std
