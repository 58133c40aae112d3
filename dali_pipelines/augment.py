"""Augmentation parameter draws and the t-vectors that describe them (spec: "Pretraining
augmentations and their parameter vectors").

Every random number of an augmentation is drawn here, once per sample, from a counter-based
generator keyed by (seed, epoch, global position, purpose): the same numbers are applied to the
views (by DALI for the visual crop, by ``kernels.augment`` on the training device for the rest)
and recorded in t_a / t_v, so the vectors describe exactly what was done. Drawing on the host
rather than with ``fn.random`` keeps the whole sample a pure function of its position, which is
what makes a resumed run bit-exact (DALI 2.4 cannot checkpoint its video decoder, see
``loader``) and keeps every draw the same whatever the world size. The source draws a
batch-sized block of samples at once (``SampleRNG``, ``draw_pretrain_block``,
``draw_finetune_block``): ~0.1 ms per sample on the 2-core VM, nothing on the GPU.

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

from kernels.transfer import to_device

T_A = 24
T_V = 18
_STREAM = {
    "audio": 1,
    "visual": 2,
    "audio_cen": 3,
    "visual_cen": 4,
    "roll": 5,
    "mixup": 6,
    "pretrain": 7,
    "frames": 8,
}


def rng_for(seed: int, epoch: int, position: int, purpose: str) -> np.random.Generator:
    """The generator of one sample's draws for one purpose (see the module docstring)."""
    return np.random.default_rng([0xA06, seed, epoch, position, _STREAM[purpose]])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on a uint64 array: a bijection whose output bits each
    depend on every input bit (arrays wrap on overflow, as the algorithm wants)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SampleRNG:
    """Draws for a block of samples at once, each sample's numbers a pure function of (seed,
    epoch, its position, purpose): the same numbers whatever block it is drawn in.

    It offers the two ``numpy.random.Generator`` methods the draw functions use, ``uniform``
    and ``integers``, for sizes whose first axis holds the block's samples' rows in order
    (``rows`` per sample, the same for all). Element e of call c, row r of sample p is
    SplitMix64 of a key of (seed, epoch, purpose, p) and the counter (c, r, e): a counter-based
    generator, so a block costs the numpy calls of one sample, not one per sample (per-sample
    generators cost ~40 us to make and ~0.7 ms of calls for a pretraining sample on the VM).
    """

    def __init__(self, seed: int, epoch: int, positions, purpose: str) -> None:
        key = np.array([0xA06], np.uint64)
        for value in (seed, epoch, _STREAM[purpose]):
            key = _mix64(key ^ np.uint64(value & _MASK64))
        positions = np.asarray(positions, np.int64).astype(np.uint64).reshape(-1)
        self._keys = _mix64((key ^ positions) * _GOLDEN)
        self.samples = len(positions)  # the block's samples: each size's first axis holds rows
        self._calls = 0
        self._layouts: dict[tuple[int, ...], np.ndarray] = {}

    def _unit(self, size) -> np.ndarray:
        """Uniform [0, 1) doubles of shape ``size`` (53 random bits each): SplitMix64's output
        number (call, row, element) of the sample's key."""
        size = (size,) if np.isscalar(size) else tuple(size)
        if size not in self._layouts:
            rows, rest = divmod(size[0], self.samples)
            if rest or not rows:
                raise ValueError(
                    f"size {size}: the first axis must hold {self.samples} samples' rows"
                )
            row = np.arange(size[0], dtype=np.uint64)[:, None]
            col = np.arange(math.prod(size[1:]), dtype=np.uint64)[None, :]
            counter = ((row % np.uint64(rows)) << np.uint64(20)) | col
            keys = self._keys[np.arange(size[0]) // rows][:, None]
            self._layouts[size] = keys + counter * _GOLDEN
        base = self._layouts[size]
        call = np.uint64(((self._calls << 40) * int(_GOLDEN)) & _MASK64)
        self._calls += 1
        bits = _mix64(base + call)
        return ((bits >> np.uint64(11)) * 2.0**-53).reshape(size)

    def uniform(self, low=0.0, high=1.0, size=None) -> np.ndarray | float:
        """``low + (high - low) * u`` (numpy's formula); ``size`` None: one float (one sample)."""
        u = self._unit(size if size is not None else 1)
        out = low + (high - low) * u
        return float(out[0]) if size is None else out

    def gamma(self, shape: float, size: int) -> np.ndarray:
        """``size`` Gamma(shape, 1) draws, one per row (Marsaglia and Tsang's method).

        Vectorised with a fixed number of tries per draw (16, from one call's uniforms): each
        is accepted with probability >= 0.95, so all 16 fail with probability < 1e-20, and then
        the last try is kept. ``shape`` < 1 via Gamma(shape + 1) * U ** (1 / shape)."""
        tries = 16
        u = self._unit((size, 3 * tries + 1))
        boost = shape < 1
        d = (shape + 1 if boost else shape) - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        # Box-Muller normals (1 - u lies in (0, 1]: no log of zero).
        z = np.sqrt(-2.0 * np.log1p(-u[:, :tries])) * np.cos(
            2.0 * math.pi * u[:, tries : 2 * tries]
        )
        v = (1.0 + c * z) ** 3
        with np.errstate(invalid="ignore", divide="ignore"):
            accept = (v > 0) & (
                np.log1p(-u[:, 2 * tries : 3 * tries]) < 0.5 * z * z + d - d * v + d * np.log(v)
            )
        pick = np.where(accept.any(axis=1), accept.argmax(axis=1), tries - 1)
        x = d * np.maximum(v[np.arange(size), pick], np.finfo(np.float64).tiny)
        if boost:
            x = x * (1.0 - u[:, -1]) ** (1.0 / shape)
        return x

    def beta(self, a: float, b: float, size: int) -> np.ndarray:
        """``size`` Beta(a, b) draws, one per row: X / (X + Y) of Gamma(a) and Gamma(b)."""
        x, y = self.gamma(a, size), self.gamma(b, size)
        return x / (x + y)

    def integers(self, low, high=None, size=None) -> np.ndarray | int:
        """Integers uniform in [low, high) (or [0, low)); ``size`` None: one int (one sample)."""
        if high is None:
            low, high = 0, low
        u = self._unit(size if size is not None else 1)
        out = low + np.floor(u * (np.asarray(high) - low)).astype(np.int64)
        return int(out[0]) if size is None else out


def rrc_params(
    rng: np.random.Generator,
    height: int | np.ndarray,
    width: int | np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    n: int = 1,
) -> np.ndarray:
    """(n, 4) crops (top, left, h, w) as ``RandomResizedCrop.get_params`` draws them.

    Per row: ten tries of a random area fraction and log-uniform aspect ratio (w/h), the first
    that fits wins; failing all ten, the largest centred crop within the ratio range. Vectorised
    over rows (the ``cen_num`` vectors draw 16 crops per sample per modality); ``height`` and
    ``width`` may differ per row ((n,) arrays).
    """
    height = np.broadcast_to(np.asarray(height, np.int64), (n,))
    width = np.broadcast_to(np.asarray(width, np.int64), (n,))
    area = (height * width)[:, None]
    u = rng.uniform(size=(n, 22))  # one call: 10 areas, 10 log-ratios, top, left
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 10:20])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # half to even, as Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h, w, found = h[rows, first], w[rows, first], fits.any(axis=1)
    i = (u[:, 20] * (height - h + 1)).astype(np.int64)
    j = (u[:, 21] * (width - w + 1)).astype(np.int64)
    if not found.all():
        fh, fw = _fallback_crop(height, width, ratio)
        h, w = np.where(found, h, fh), np.where(found, w, fw)
        i = np.where(found, i, (height - fh) // 2)
        j = np.where(found, j, (width - fw) // 2)
    return np.stack([i, j, h, w], axis=1)


def _fallback_crop(
    height: np.ndarray, width: np.ndarray, ratio: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the largest centred crop (h, w) within the ratio range (torchvision's
    fallback: Python's round of the side that is cut; numpy's round is the same, half to even,
    on the same float64 quotients). Vectorised: the audio image (1024 x 128 against ratios
    3/4..4/3) takes it for most rows."""
    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    fh = np.where(in_ratio < lo, np.round(width / lo).astype(np.int64), height)
    fw = np.where(in_ratio > hi, np.round(height * hi).astype(np.int64), width)
    return fh, fw


def _jitter(rng: np.random.Generator, aug, out: np.ndarray, at: int) -> None:
    """Writes [on, order x4, b-1, c-1, s-1, h] into ``out[:, at:]`` per row (the order and
    factors of ``ColorJitter.get_params``: a permutation, then uniform factors around 1)."""
    u = rng.uniform(size=(len(out), 9))  # one call: on, the order's keys, the four factors
    on = u[:, 0] < aug.jitter_p
    order = np.argsort(u[:, 1:5], axis=1)  # a uniform random permutation
    # The four factors, uniform in +-(brightness, contrast, saturation, hue).
    bounds = np.array([aug.brightness, aug.contrast, aug.saturation, aug.hue])
    factors = bounds * (2.0 * u[:, 5:9] - 1.0)
    out[:, at] = on
    out[:, at + 1 : at + 5] = np.where(on[:, None], order, np.arange(4))
    out[:, at + 5 : at + 9] = np.where(on[:, None], factors, 0.0)


def _blur(rng: np.random.Generator, aug, out: np.ndarray, at: int) -> None:
    u = rng.uniform(size=(len(out), 2))
    on = u[:, 0] < aug.blur_p
    lo, hi = aug.blur_sigma
    sigma = lo + (hi - lo) * u[:, 1]
    out[:, at] = on
    out[:, at + 1] = np.where(on, sigma, 0.0)


@dataclass(frozen=True)
class AudioDraw:
    """Audio augmentation draws: t_a (n, 24) and the integer crops that t_a scales."""

    t: np.ndarray  # (n, 24) float32
    crop: np.ndarray  # (n, 4) int: (i, j, h, w) on the (T, F) image
    shift: np.ndarray  # (n,) time shifts in frames (0 where SpecAugment is off)


def draw_audio(
    rng: np.random.Generator,
    aug,
    frames: int,
    bins: int,
    time_mask: int,
    freq_mask: int,
    n: int = 1,
) -> AudioDraw:
    """Draw ``n`` pretraining audio augmentations (``aug``: ``AugmentConfig``)."""
    t = np.zeros((n, T_A), np.float64)
    u = rng.uniform(size=(n, 7))  # one call: on, the two masks' widths and starts, shift, flip
    on = u[:, 0] < aug.specaug_p
    tv, tu = u[:, 1] * time_mask, u[:, 2]
    fv, fu = u[:, 3] * freq_mask, u[:, 4]
    shift = np.where(on, np.floor(u[:, 5] * (2 * frames)).astype(np.int64) - frames, 0)
    t0 = np.floor(tu * (frames - tv))
    f0 = np.floor(fu * (bins - fv))
    # Written column by column (np.stack of seven columns cost more than the draws).
    t[:, 0] = 1.0
    t[:, 1], t[:, 2] = t0, t0 + np.floor(tv)
    t[:, 3], t[:, 4] = f0, f0 + np.floor(fv)
    t[:, 5], t[:, 6] = 1.0, shift / frames
    t[~on, 0:7] = 0.0
    crop = rrc_params(rng, frames, bins, aug.audio_rrc_scale, aug.audio_rrc_ratio, n)
    t[:, 7] = 1.0
    t[:, 8:12] = crop / np.array([bins, frames, bins, frames])
    _jitter(rng, aug, t, 12)
    _blur(rng, aug, t, 21)
    t[:, 23] = u[:, 6] < aug.flip_p
    return AudioDraw(t.astype(np.float32), crop, shift)


@dataclass(frozen=True)
class VisualDraw:
    """Visual augmentation draws: t_v (n, 18) and the integer crops on the decoded frame."""

    t: np.ndarray  # (n, 18) float32
    crop: np.ndarray  # (n, 4) int: (i, j, h, w) on the (H, W) frame


def draw_visual(
    rng: np.random.Generator, aug, height: int | np.ndarray, width: int | np.ndarray, n: int = 1
) -> VisualDraw:
    """Draw ``n`` pretraining visual augmentations on ``height`` x ``width`` frames (one size,
    or one per row)."""
    t = np.zeros((n, T_V), np.float64)
    flip, gray = rng.uniform(size=(n, 2)).T
    crop = rrc_params(rng, height, width, aug.visual_rrc_scale, aug.visual_rrc_ratio, n)
    t[:, 0] = 1.0
    size = np.stack(np.broadcast_arrays(height, width, height, width), axis=-1)
    t[:, 1:5] = crop / size
    _jitter(rng, aug, t, 5)
    _blur(rng, aug, t, 14)
    t[:, 16] = flip < aug.flip_p
    t[:, 17] = gray < aug.gray_p
    return VisualDraw(t.astype(np.float32), crop)


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
    ta = draw_audio(ra, aug, frames, bins, time_mask, freq_mask, n=count).t
    tv = draw_visual(rv, aug, image_size, image_size, n=count).t
    return ta, tv


@dataclass(frozen=True)
class PretrainDraw:
    """Pretraining samples' draws, ``rows`` per sample in ``audio`` / ``visual``: a sample's
    first row is applied to its views, the next ``cen_num`` are its sampled, never applied
    vectors; ``roll`` holds each sample's clean fbank time roll in frames."""

    audio: AudioDraw
    visual: VisualDraw
    roll: np.ndarray  # (samples,) int
    rows: int

    def sample(self, b: int) -> PretrainDraw:
        """The draws of the block's sample ``b`` alone."""
        rows = slice(b * self.rows, (b + 1) * self.rows)
        a, v = self.audio, self.visual
        return PretrainDraw(
            AudioDraw(a.t[rows], a.crop[rows], a.shift[rows]),
            VisualDraw(v.t[rows], v.crop[rows]),
            self.roll[b : b + 1],
            self.rows,
        )


def draw_pretrain_block(
    seed: int,
    epoch: int,
    positions,
    aug,
    frames: int,
    bins: int,
    time_mask: int,
    freq_mask: int,
    frame_size: tuple[int, int],
    image_size: int,
    cen_num: int,
) -> PretrainDraw:
    """All draws of the pretraining samples at ``positions``, in one vectorised pass (the
    source's cost is the number of numpy calls, not their size); sample p's draws are the same
    in any block (``SampleRNG``). The applied visual crop is drawn on a decoded frame of
    ``frame_size`` (H, W), the cen crops on an ``image_size`` square, as the original does;
    ``frame_size`` is one size for the block (a sample of another size draws its own block)."""
    rng = SampleRNG(seed, epoch, positions, "pretrain")
    samples, rows = rng.samples, 1 + cen_num
    audio = draw_audio(rng, aug, frames, bins, time_mask, freq_mask, n=samples * rows)
    heights = np.full((samples, rows), image_size, np.int64)
    widths = heights.copy()
    heights[:, 0], widths[:, 0] = frame_size
    visual = draw_visual(rng, aug, heights.reshape(-1), widths.reshape(-1), n=samples * rows)
    roll = rng.integers(-frames, frames, size=samples)
    return PretrainDraw(audio, visual, roll, rows)


@dataclass(frozen=True)
class FinetuneDraw:
    """Finetuning samples' draws: mixup (whether, the partner's entry, lambda), SpecAugment's
    masks [t0, t1, f0, f1] (torchaudio-style: width uniform up to the maximum) and the clean
    fbank's time roll, one row per sample."""

    mix: np.ndarray  # (samples,) bool
    partner: np.ndarray  # (samples,) int: an entry of the whole list
    lam: np.ndarray  # (samples,) float
    masks: np.ndarray  # (samples, 4) int
    roll: np.ndarray  # (samples,) int, in [-frames, frames)


def draw_finetune_block(
    seed: int,
    epoch: int,
    positions,
    aug,
    entries: int,
    frames: int,
    bins: int,
) -> FinetuneDraw:
    """The finetuning draws of the samples at ``positions`` in one vectorised pass (see
    ``SampleRNG``): mixup with probability ``aug.mixup``, the partner uniform over the
    ``entries`` of the list, lambda ~ Beta(mixup_alpha, mixup_alpha); time and frequency masks
    up to ``aug.ft_timem`` / ``aug.ft_freqm`` wide on the (frames, bins) image; the roll."""
    rng = SampleRNG(seed, epoch, positions, "mixup")
    samples = rng.samples
    u = rng.uniform(size=(samples, 7))  # mix, partner, two widths and starts, roll
    lam = rng.beta(aug.mixup_alpha, aug.mixup_alpha, samples)
    masks = np.empty((samples, 4), np.int64)
    for col, (width, size) in enumerate(((aug.ft_timem, frames), (aug.ft_freqm, bins))):
        value = u[:, 2 + 2 * col] * width
        start = u[:, 3 + 2 * col] * (size - value)
        masks[:, 2 * col] = start  # truncated towards zero, as int() of these positive values
        masks[:, 2 * col + 1] = start + value
    return FinetuneDraw(
        mix=u[:, 0] < aug.mixup,
        partner=np.floor(u[:, 1] * entries).astype(np.int64),
        lam=lam,
        masks=masks,
        roll=np.floor(u[:, 6] * (2 * frames)).astype(np.int64) - frames,
    )


# ------------------------------------------------------------------------------------------------
# Application on the training device (right after the DALI iterator), from the recorded vectors
# ------------------------------------------------------------------------------------------------


def apply_audio(
    x: torch.Tensor, t: torch.Tensor, params: torch.Tensor, time_shift_applied: bool = True
) -> torch.Tensor:
    """The augmented audio view of a (B, 3, T, F) clean filterbank image (equal channels), as
    t_a describes it: (B, 3, T, F), the transpose of a contiguous (B, 3, F, T) tensor.

    ``params`` (B, 6) int: [clean roll, crop i, j, h, w, time shift]; the crop is passed as
    integers because t_a records it scaled by the original's swapped factors. With
    ``time_shift_applied`` False the shift is recorded but not applied (the original's no-op).
    """
    from kernels import augment as K

    # The vectors stay on the host: the kernels select samples and check values where their
    # parameters live, so host parameters cost a GPU no synchronisation (on a device they cost
    # one per mask: ~65 per batch, which made this stage launch- and sync-bound on an H100).
    t, params = t.cpu(), params.cpu().long()
    spec = t[:, 0] > 0
    # The three channels are equal until the colour jitter: mask, roll and crop one of them
    # (into a new tensor; every kernel after it writes into its predecessor's result, owned,
    # so no input of this function is modified).
    shift = params[:, 5] if time_shift_applied else torch.zeros_like(params[:, 5])
    x = K.fbank_geometry(x[:, :1], t[:, 1:5].long(), spec, shift, params[:, 1:5])
    frames, bins = x.shape[2], x.shape[3]
    # Written once, into the model's (B, 3, F, T) layout: the result is that buffer's transpose,
    # so the consumer's transpose back is contiguous without another copy of the batch.
    out = torch.empty(x.shape[0], 3, bins, frames, device=x.device)
    # The channels stay equal through jitter, blur and flip unless hue comes first in the jitter
    # (it clamps two channels of three). On a CPU only those samples are processed with three
    # channels (arithmetic is the cost there). On a GPU every sample is: one launch per op
    # instead of one per channel group, and shapes that no longer depend on the draws; the
    # other samples' three channels stay equal, so their values are the same either way.
    three = (t[:, 12] > 0) & (t[:, 13] == 3)
    if K.whole_batch_ops(x):
        three = torch.ones_like(three)
    for rows, channels in ((~three).nonzero().flatten(), 1), (three.nonzero().flatten(), 3):
        if len(rows) == x.shape[0]:
            whole = x.expand(-1, channels, -1, -1).contiguous()  # written into: no overlap
            K.flip_transpose_into(out, None, _audio_colour(whole, t), t[:, 23] > 0)
        elif len(rows):
            on_device = to_device(rows, x.device)
            sub = x[on_device].expand(-1, channels, -1, -1).contiguous()
            K.flip_transpose_into(out, rows, _audio_colour(sub, t[rows]), t[rows, 23] > 0)
    return out.transpose(2, 3)


def _audio_colour(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Colour jitter and blur of t_a's rows ``t`` on x: (n, 1 or 3, T, F), an intermediate of
    ``apply_audio`` that is overwritten (the flip comes with the write into the output)."""
    from kernels import augment as K

    x = K.color_jitter(x, t[:, 13:17].long(), _factors(t[:, 17:21]), t[:, 12] > 0, owned=True)
    sigma = t[:, 22]
    return K.gaussian_blur(x, sigma, K.audio_blur_kernel_size(sigma), t[:, 21] > 0, owned=True)


def apply_visual(x: torch.Tensor, t: torch.Tensor, mean, std) -> torch.Tensor:
    """The rest of the augmented visual view after DALI's crop: (B, 3, S, S) in [0, 1] ->
    jitter, blur, flip, grayscale as t_v describes, then ImageNet normalisation."""
    from kernels import augment as K

    t = t.cpu()  # host parameters: no device synchronisation (see apply_audio)
    x = K.color_jitter(x, t[:, 6:10].long(), _factors(t[:, 10:14]), t[:, 5] > 0)
    # x is now this function's own intermediate: the later kernels write into it.
    sigma = t[:, 15]
    x = K.gaussian_blur(x, sigma, K.visual_blur_kernel_size(sigma), t[:, 14] > 0, owned=True)
    return K.finish_visual(x, t[:, 16] > 0, t[:, 17] > 0, mean, std, owned=True)


def _factors(recorded: torch.Tensor) -> torch.Tensor:
    """[b-1, c-1, s-1, h] as recorded -> [b, c, s, h] as applied."""
    return recorded + torch.tensor([1.0, 1.0, 1.0, 0.0], device=recorded.device)
