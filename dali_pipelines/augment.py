"""Augmentation parameter draws and the t-vectors that describe them (spec: "Pretraining
augmentations and their parameter vectors").

Every random number of an augmentation is drawn here, once per sample, from a counter-based
generator keyed by (seed, epoch, global position, purpose): the same numbers are applied to the
views (by DALI for the visual crop, by ``kernels.augment`` on the training device for the rest)
and recorded in t_a / t_v, so the vectors describe exactly what was done. Drawing on the host
rather than with ``fn.random`` keeps the whole sample a pure function of its position, which is
what makes a resumed run bit-exact (DALI 2.4 cannot checkpoint its video decoder, see
``loader``) and keeps every draw the same whatever the world size. The draws cost microseconds
per sample in the source's worker and nothing on the GPU.

Index layouts (spec), with T = fbank frames (1024) and F = mel bins (128):

t_a (24): [0] SpecAugment on; [1], [2] time mask start/end (frames); [3], [4] frequency mask
start/end (bins); [5] time shift on (= [0]); [6] shift / T; [7] crop (always 1); [8] i / F;
[9] j / T; [10] h / F; [11] w / T (the original's swapped scaling, kept: the released augmentation
encoder was trained on these ranges); [12] jitter on; [13..16] order; [17..20] b-1, c-1, s-1, h;
[21] blur on; [22] sigma; [23] flip on.

t_v (18): [0] crop (always 1); [1..4] i/H, j/W, h/H, w/W; [5] jitter on; [6..9] order;
[10..13] b-1, c-1, s-1, h; [14] blur on; [15] sigma; [16] flip on; [17] grayscale on.

Off means the neutral values: zeros, with the order slots 0, 1, 2, 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

T_A = 24
T_V = 18
_STREAM = {"audio": 1, "visual": 2, "audio_cen": 3, "visual_cen": 4, "roll": 5, "mixup": 6}


def rng_for(seed: int, epoch: int, position: int, purpose: str) -> np.random.Generator:
    """The generator of one sample's draws for one purpose (see the module docstring)."""
    return np.random.default_rng([0xA06, seed, epoch, position, _STREAM[purpose]])


def rrc_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as ``torchvision.transforms.RandomResizedCrop.get_params`` draws them.

    Ten tries of a random area fraction and log-uniform aspect ratio (w/h); failing those, the
    largest centred crop within the ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter(rng: np.random.Generator, aug, out: np.ndarray, at: int) -> None:
    """Writes [on, order x4, b-1, c-1, s-1, h] at ``out[at:]`` (the order and factors of
    ``ColorJitter.get_params``: a permutation, then uniform factors around 1)."""
    on = rng.uniform() < aug.jitter_p
    order = rng.permutation(4)
    b = rng.uniform(1 - aug.brightness, 1 + aug.brightness)
    c = rng.uniform(1 - aug.contrast, 1 + aug.contrast)
    s = rng.uniform(1 - aug.saturation, 1 + aug.saturation)
    h = rng.uniform(-aug.hue, aug.hue)
    if on:
        out[at] = 1
        out[at + 1 : at + 5] = order
        out[at + 5 : at + 9] = (b - 1, c - 1, s - 1, h)
    else:
        out[at + 1 : at + 5] = (0, 1, 2, 3)


@dataclass(frozen=True)
class AudioDraw:
    """One sample's audio augmentation: its t_a and the integer crop that t_a scales."""

    t: np.ndarray  # (24,) float32
    crop: tuple[int, int, int, int]  # (i, j, h, w) on the (T, F) image
    shift: int  # time shift in frames (0 when SpecAugment is off)


def draw_audio(
    rng: np.random.Generator, aug, frames: int, bins: int, time_mask: int, freq_mask: int
) -> AudioDraw:
    """Draw the pretraining audio augmentation of one sample (``aug``: ``AugmentConfig``)."""
    t = np.zeros(T_A, np.float64)
    on = rng.uniform() < aug.specaug_p
    tv, tu = rng.uniform() * time_mask, rng.uniform()
    fv, fu = rng.uniform() * freq_mask, rng.uniform()
    shift = int(rng.integers(-frames, frames))
    if on:
        t0 = math.floor(tu * (frames - tv))
        f0 = math.floor(fu * (bins - fv))
        t[0:7] = (1, t0, t0 + math.floor(tv), f0, f0 + math.floor(fv), 1, shift / frames)
    else:
        shift = 0
    i, j, h, w = rrc_params(rng, frames, bins, aug.audio_rrc_scale, aug.audio_rrc_ratio)
    t[7:12] = (1, i / bins, j / frames, h / bins, w / frames)
    _jitter(rng, aug, t, 12)
    blur_on, sigma = rng.uniform() < aug.blur_p, rng.uniform(*aug.blur_sigma)
    if blur_on:
        t[21:23] = (1, sigma)
    t[23] = float(rng.uniform() < aug.flip_p)
    return AudioDraw(t.astype(np.float32), (i, j, h, w), shift)


@dataclass(frozen=True)
class VisualDraw:
    """One sample's visual augmentation: its t_v and the integer crop on the decoded frame."""

    t: np.ndarray  # (18,) float32
    crop: tuple[int, int, int, int]  # (i, j, h, w) on the (H, W) frame


def draw_visual(rng: np.random.Generator, aug, height: int, width: int) -> VisualDraw:
    """Draw the pretraining visual augmentation of one sample on a ``height`` x ``width`` frame."""
    t = np.zeros(T_V, np.float64)
    i, j, h, w = rrc_params(rng, height, width, aug.visual_rrc_scale, aug.visual_rrc_ratio)
    t[0:5] = (1, i / height, j / width, h / height, w / width)
    _jitter(rng, aug, t, 5)
    blur_on, sigma = rng.uniform() < aug.blur_p, rng.uniform(*aug.blur_sigma)
    if blur_on:
        t[14:16] = (1, sigma)
    t[16] = float(rng.uniform() < aug.flip_p)
    t[17] = float(rng.uniform() < aug.gray_p)
    return VisualDraw(t.astype(np.float32), (i, j, h, w))


def neutral_audio() -> np.ndarray:
    """t_a of no transformation: zeros, crop flag 1 over the whole image, order 0, 1, 2, 3."""
    t = np.zeros(T_A, np.float32)
    t[13:17] = (0, 1, 2, 3)
    return t


def neutral_visual() -> np.ndarray:
    """t_v of no transformation (see ``neutral_audio``)."""
    t = np.zeros(T_V, np.float32)
    t[6:10] = (0, 1, 2, 3)
    return t


def draw_cen(
    seed: int,
    epoch: int,
    position: int,
    aug,
    count: int,
    frames: int,
    bins: int,
    time_mask: int,
    freq_mask: int,
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` sampled-but-never-applied vectors per modality: (count, 24), (count, 18).

    Drawn with the same distributions; the visual crops against an ``image_size`` square and the
    audio crops against the (frames, bins) image, as the original does.
    """
    ra, rv = (
        rng_for(seed, epoch, position, "audio_cen"),
        rng_for(seed, epoch, position, "visual_cen"),
    )
    ta = np.stack([draw_audio(ra, aug, frames, bins, time_mask, freq_mask).t for _ in range(count)])
    tv = np.stack([draw_visual(rv, aug, image_size, image_size).t for _ in range(count)])
    return ta, tv


# ------------------------------------------------------------------------------------------------
# Application on the training device (right after the DALI iterator), from the recorded vectors
# ------------------------------------------------------------------------------------------------


def apply_audio(
    x: torch.Tensor, t: torch.Tensor, params: torch.Tensor, time_shift_applied: bool = True
) -> torch.Tensor:
    """The augmented audio view of a (B, 3, T, F) clean filterbank image (equal channels), as
    t_a describes it.

    ``params`` (B, 6) int: [clean roll, crop i, j, h, w, time shift]; the crop is passed as
    integers because t_a records it scaled by the original's swapped factors. With
    ``time_shift_applied`` False the shift is recorded but not applied (the original's no-op).
    """
    from kernels import augment as K

    t = t.to(x.device)
    params = params.to(x.device).long()
    spec = t[:, 0] > 0
    # The three channels are equal until the colour jitter: mask, roll and crop one of them.
    x = x[:, :1]
    x = K.mask_rows(x, t[:, 1].long(), t[:, 2].long(), 2, spec)
    x = K.mask_rows(x, t[:, 3].long(), t[:, 4].long(), 3, spec)
    if time_shift_applied:
        x = K.roll(x, params[:, 5], 2, spec)
    frames, bins = x.shape[2], x.shape[3]
    x = K.resized_crop(x, params[:, 1], params[:, 2], params[:, 3], params[:, 4], (frames, bins))
    x = x.expand(-1, 3, -1, -1).contiguous()
    x = K.color_jitter(x, t[:, 13:17].long(), _factors(t[:, 17:21]), t[:, 12] > 0)
    sigma = t[:, 22]
    x = K.gaussian_blur(x, sigma, K.audio_blur_kernel_size(sigma), t[:, 21] > 0)
    return K.hflip(x, t[:, 23] > 0)


def apply_visual(x: torch.Tensor, t: torch.Tensor, mean, std) -> torch.Tensor:
    """The rest of the augmented visual view after DALI's crop: (B, 3, S, S) in [0, 1] ->
    jitter, blur, flip, grayscale as t_v describes, then ImageNet normalisation."""
    from kernels import augment as K

    t = t.to(x.device)
    x = K.color_jitter(x, t[:, 6:10].long(), _factors(t[:, 10:14]), t[:, 5] > 0)
    sigma = t[:, 15]
    x = K.gaussian_blur(x, sigma, K.visual_blur_kernel_size(sigma), t[:, 14] > 0)
    x = K.hflip(x, t[:, 16] > 0)
    x = K.grayscale(x, t[:, 17] > 0)
    return K.normalize(x, mean, std)


def _factors(recorded: torch.Tensor) -> torch.Tensor:
    """[b-1, c-1, s-1, h] as recorded -> [b, c, s, h] as applied."""
    return recorded + torch.tensor([1.0, 1.0, 1.0, 0.0], device=recorded.device)
