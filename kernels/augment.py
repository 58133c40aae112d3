"""Batched augmentation kernels for the EquiAV views, applied on the training device.

The random parameters are drawn per sample on the host (``dali_pipelines.augment``) and recorded in
the t-vectors; these functions apply the same numbers to a whole (B, C, H, W) float32 batch, on CPU
or CUDA with the same code. The reference semantics are ``torchvision.transforms.functional`` on
float tensors (spec: "Pretraining augmentations and their parameter vectors"), sample by sample:

- ``resized_crop``: crop, then ``interpolate(bilinear, align_corners=False, antialias)``; equal to
  torchvision's tensor path bit for bit (it is the same interpolation call, one sample at a time,
  because crops differ in size).
- ``adjust_brightness/contrast/saturation/hue`` and ``color_jitter``: torchvision's float formulas
  written with the same float32 operations in the same order, so the results are equal bit for
  bit on CPU (the tests allow 1e-6, hue 1e-5). Like torchvision, brightness, contrast and saturation
  clamp to [0, 1] (so a normalised fbank is clipped to [0, 1] whenever jitter is on), and hue
  clamps only the p/q/t terms of its HSV -> RGB step, not v.
- ``gaussian_blur``: torchvision's normalised 1-D Gaussian, reflect padding, depthwise convolution;
  applied as two 1-D passes instead of one 2-D pass (same function; rounding differs by a few ulp).
- ``hflip``, ``grayscale`` (three equal channels), ``normalize``; ``mask_rows`` and ``roll`` for the
  fbank image (SpecAugment masks and the time shift, compared with slicing and ``torch.roll``).
- ``fbank_geometry``: the audio view's masks, time roll and resized crop in one call;
  ``finish_visual``: the visual view's flip, grayscale and normalisation in one call;
  ``flip_transpose_into``: the audio view's flip and its write into the model's layout.

Conventions: per-sample parameters are 1-D tensors of length B (lists are accepted); they may live
on the host or on x's device. Checks and index selection run where the parameters live, so host
parameters cost the device no synchronisation. ``active`` (B,) bool selects the samples an op
touches (None: all); inactive samples come back bit for bit unchanged. Inputs are never modified,
except with ``owned=True``: the caller says x is its own intermediate (made by an earlier kernel of
a chain), which the kernel may then overwrite and return (on a CPU this saves a full-batch copy
and fresh memory per op; the values are the same either way).

On a CUDA tensor (triton importable) ``color_jitter``, ``gaussian_blur``, ``fbank_geometry``,
``finish_visual`` and ``flip_transpose_into`` run as fused Triton kernels
(``kernels.augment_triton``: two launches per blur, one for each of the others; the same
numbers within the tolerances above and in tests/test_augment_triton.py); the other functions,
and everything on a CPU, run the torch code here.
Every function runs in float32 with autocast disabled, so an enclosing ``torch.autocast`` cannot
change the views. torchvision rounds its Python-float factors to float32 on float32 images; ours are
float32 tensors, so pass the same float32 numbers to both when comparing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kernels import augment_triton as fused
from kernels.transfer import to_device

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, as TensorFlow rounds them).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# HSV -> RGB: for each hue sector 0..5, which of the candidates (v, q, p, t) is r, g and b.
_HSV_SECTORS = ((0, 3, 2), (1, 0, 2), (2, 0, 3), (2, 1, 0), (3, 2, 0), (0, 2, 1))

Param = torch.Tensor | Sequence[float] | Sequence[int]


# ------------------------------------------------------------------------------------------------
# Argument handling
# ------------------------------------------------------------------------------------------------


def _float32_kernel(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Check that x is a (B, C, H, W) float32 batch and run ``fn`` with autocast disabled."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x)
            raise TypeError(f"{fn.__name__}: x must be a (B, C, H, W) float32 tensor, got {got}")
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def _param(value: Param, batch: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A (B,) parameter as a tensor of ``dtype`` on its own device (lists go to the host)."""
    t = torch.as_tensor(value)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    if t.is_floating_point() and not dtype.is_floating_point:
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold whole numbers, got {t.tolist()}")
    return t.to(dtype)


def _active(active: Param | None, batch: int) -> torch.Tensor:
    """The (B,) bool mask of samples to change (None: all)."""
    if active is None:
        return torch.ones(batch, dtype=torch.bool)
    mask = torch.as_tensor(active)
    if mask.shape != (batch,) or mask.dtype != torch.bool:
        raise ValueError(
            f"active must be a ({batch},) bool tensor, got {tuple(mask.shape)} {mask.dtype}"
        )
    return mask


def _require(ok: torch.Tensor | np.ndarray, message: str | Callable[[], str]) -> None:
    """Raise ValueError(message) unless every element of ``ok`` is true; a callable message is
    built only then (the messages that list the parameters cost host time on every call)."""
    if not bool(ok.all()):
        raise ValueError(message() if callable(message) else message)


def _apply(
    x: torch.Tensor,
    active: torch.Tensor,
    fn: Callable[..., torch.Tensor],
    *params: torch.Tensor,
    owned: bool = False,
    gather: bool = False,
) -> torch.Tensor:
    """``fn(x[i], *params[i])`` written into a copy of x for the active samples i.

    ``fn`` works on a (n, C, H, W) sub-batch with (n,) parameters on x's device and must return a
    new tensor; the inactive samples are copied untouched. ``fn`` is per sample, so either way of
    selecting (``whole_batch_ops``) gives the same numbers; an inactive sample's parameters may be
    meaningless (its result is discarded). ``owned``: x is the caller's own intermediate (made by
    an earlier op), so the CPU path writes into it instead of into a new tensor. ``gather``: the
    CPU path calls ``fn`` once on the gathered active samples instead of once per run of
    consecutive ones (the blur: a convolution's algorithm, and so its rounding, depends on its
    channel count, and one call per kernel size keeps a sample's result independent of which
    other samples are active).
    """
    index = active.nonzero().flatten()
    if index.numel() == x.shape[0]:  # all active: no gather/scatter needed
        return fn(x, *(to_device(p, x.device) for p in params))
    if index.numel() and whole_batch_ops(x):
        full = fn(x, *(to_device(p, x.device) for p in params))
        return torch.where(_column(to_device(active, x.device)), full, x)
    if owned:
        out = x
    else:  # the inactive rows are copied, the active ones written below
        out = torch.empty_like(x)
        for a, b in _runs((~active.cpu()).nonzero().flatten().tolist()):
            out[a:b] = x[a:b]
    if gather and index.numel():
        index_x = to_device(index, x.device)
        out[index_x] = fn(x[index_x], *(to_device(p[index], x.device) for p in params))
        return out
    # Runs of consecutive samples are views: no gather of the active rows, no index scatter.
    for a, b in _runs(index.tolist()):
        out[a:b] = fn(x[a:b], *(to_device(p[a:b], x.device) for p in params))
    return out


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [start, end) runs of consecutive rows: [0, 1, 2, 5] -> (0, 3),
    (5, 6)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def whole_batch_ops(x: torch.Tensor) -> bool:
    """The kernels' policy for x's device: one op over the whole batch (a GPU: there the cost is
    the host's launches; ``_apply`` runs ``fn`` on every sample and keeps the active ones with one
    ``where``, masks and rolls are one broadcast op each), or ops on the active samples' slices
    (a CPU: there the cost is the arithmetic and memory traffic, which whole-batch ops multiply).
    Both give the same numbers."""
    return x.is_cuda


def _bands_inside(start, end, length: int):
    """0 <= start <= end <= length, elementwise (torch tensors or numpy arrays)."""
    return (start >= 0) & (start <= end) & (end <= length)


def _crops_inside(top, left, height, width, h_in: int, w_in: int):
    """Non-empty crops inside an h_in x w_in image, elementwise (torch tensors or numpy)."""
    ok = (top >= 0) & (left >= 0) & (height >= 1) & (width >= 1)
    return ok & (top + height <= h_in) & (left + width <= w_in)


def _column(p: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 1, 1, 1), to broadcast one value per sample over (n, C, H, W)."""
    return p.view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


@_float32_kernel
def resized_crop(
    x: torch.Tensor,
    top: Param,
    left: Param,
    height: Param,
    width: Param,
    out_size: tuple[int, int],
    antialias: bool = True,
) -> torch.Tensor:
    """Per sample ``x[b, :, top:top+height, left:left+width]`` resized to ``out_size`` (oh, ow).

    Bilinear with align_corners=False and (by default) antialiasing, as torchvision's
    ``F.resized_crop(x[b], top, left, height, width, out_size, BILINEAR, antialias=antialias)`` on a
    tensor. Crops must lie inside the image. Returns (B, C, oh, ow).
    """
    batch, channels, h_in, w_in = x.shape
    oh, ow = (int(s) for s in out_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    names = ("top", "left", "height", "width")
    params = [
        _param(p, batch, n, torch.long)
        for p, n in zip((top, left, height, width), names, strict=True)
    ]
    boxes = torch.stack([p.cpu() for p in params], 1)
    bad = (~_crops_inside(*boxes.T, h_in, w_in)).nonzero().flatten().tolist()
    if bad:
        t, le, h, w = boxes[bad[0]].tolist()
        raise ValueError(
            f"resized_crop: sample {bad[0]} crop (top={t}, left={le}, height={h}, width={w}) "
            f"is not inside the {h_in}x{w_in} image"
        )
    out = x.new_empty(batch, channels, oh, ow)
    # One interpolation per sample: crops differ in size, and this is torchvision's own call.
    for b, (t, le, h, w) in enumerate(boxes.tolist()):
        crop = x[b : b + 1, :, t : t + h, le : le + w]
        if (h, w) == (oh, ow):  # torchvision returns a same-size crop as it is
            out[b] = crop[0]
        else:
            out[b] = F.interpolate(
                crop, size=(oh, ow), mode="bilinear", align_corners=False, antialias=antialias
            )[0]
    return out


@_float32_kernel
def hflip(x: torch.Tensor, active: Param | None = None, *, owned: bool = False) -> torch.Tensor:
    """Reverse the last axis (W) of the active samples (torchvision ``F.hflip``)."""
    return _apply(x, _active(active, x.shape[0]), lambda s: s.flip(-1), owned=owned)


@_float32_kernel
def mask_rows(
    x: torch.Tensor,
    start: Param,
    end: Param,
    axis: int,
    active: Param | None = None,
    *,
    owned: bool = False,
    fill: float = 0.0,
) -> torch.Tensor:
    """Set positions [start, end) along ``axis`` (2: time rows, 3: frequency columns) to
    ``fill`` (0 unless given).

    The SpecAugment masks of the fbank image; needs 0 <= start <= end <= x.shape[axis] for the
    active samples.
    """
    batch = x.shape[0]
    axis = _spatial_axis(axis)
    length = x.shape[axis]
    start = _param(start, batch, "start", torch.long)
    end = _param(end, batch, "end", torch.long)
    mask = _active(active, batch).to(start.device)
    ok = _bands_inside(start, end, length)
    _require(ok | ~mask, f"mask_rows: need 0 <= start <= end <= {length} on axis {axis}")
    if not whole_batch_ops(x):
        # Zero each sample's band as a slice (a CPU: no pass over the whole batch).
        out = x if owned else x.clone()
        hit = mask & (end > start)
        rows = hit.nonzero().flatten().tolist()
        for b, s, e in zip(rows, start[hit].tolist(), end[hit].tolist(), strict=True):
            out[b].narrow(axis - 1, s, e - s).fill_(fill)
        return out
    pos = torch.arange(length, device=x.device)
    start, end, mask = (to_device(p, x.device) for p in (start, end, mask))
    hit = (pos >= start[:, None]) & (pos < end[:, None]) & mask[:, None]  # (B, length)
    shape = (batch, 1, length, 1) if axis == 2 else (batch, 1, 1, length)
    return x.masked_fill(hit.view(shape), fill)


@_float32_kernel
def roll(x: torch.Tensor, shift: Param, axis: int, active: Param | None = None) -> torch.Tensor:
    """``torch.roll(x[b], shift[b], axis - 1)`` per active sample, as one gather over the batch."""
    batch = x.shape[0]
    axis = _spatial_axis(axis)
    length = x.shape[axis]
    shift = _param(shift, batch, "shift", torch.long)
    shift = torch.where(_active(active, batch).to(shift.device), shift, 0)
    if not whole_batch_ops(x):
        # Two slice copies per sample (a CPU: a gather reads an index per element).
        out = torch.empty_like(x)
        for b, s in enumerate(torch.remainder(shift, length).tolist()):
            out[b].narrow(axis - 1, s, length - s).copy_(x[b].narrow(axis - 1, 0, length - s))
            out[b].narrow(axis - 1, 0, s).copy_(x[b].narrow(axis - 1, length - s, s))
        return out
    shift = to_device(shift, x.device)
    # torch.roll: out[j] = x[(j - shift) mod length]; remainder is non-negative for any sign.
    source = torch.remainder(torch.arange(length, device=x.device) - shift[:, None], length)
    shape = (batch, 1, length, 1) if axis == 2 else (batch, 1, 1, length)
    return torch.gather(x, axis, source.view(shape).expand(x.shape))


@_float32_kernel
def fbank_geometry(
    x: torch.Tensor, masks: Param, spec: Param, shift: Param, crop: Param
) -> torch.Tensor:
    """The geometric part of the audio augmentation on (B, 1, T, F) filterbank images: per
    sample SpecAugment's time and frequency masks, then the time roll, then the resized crop
    back to (T, F) (``mask_rows`` twice, ``roll``, ``resized_crop``). Returns a new tensor.

    masks (B, 4) [time start, end, frequency start, end] and shift (B,) apply where spec (B,)
    bool is set; crop (B, 4) [top, left, height, width] applies to every sample and must lie
    inside the image. On a GPU one fused launch (``kernels.augment_triton``): bilinear, within
    ~1e-6 of torchvision's antialiased resize, which for these upsampling crops has the same
    two taps per axis.
    """
    batch, channels, frames, bins = x.shape
    if channels != 1:
        raise ValueError(f"fbank_geometry needs one-channel images, got {channels} channels")
    masks, crop = torch.as_tensor(masks), torch.as_tensor(crop)
    if masks.shape != (batch, 4) or crop.shape != (batch, 4):
        raise ValueError(f"masks and crop must have shape ({batch}, 4)")
    spec = _active(spec, batch)
    shift = _param(shift, batch, "shift", torch.long)
    if not fused.fused_path(x):
        x = mask_rows(x, masks[:, 0], masks[:, 1], 2, spec)
        x = mask_rows(x, masks[:, 2], masks[:, 3], 3, spec, owned=True)
        if bool((shift[spec.to(shift.device)] != 0).any()):  # a zero roll is a copy: skip it
            x = roll(x, shift, 2, spec)
        return resized_crop(x, *crop.T, (frames, bins))
    # The checks of the four kernels, in numpy on the host (no device op, no sync).
    m, c, on = masks.cpu().long().numpy(), crop.cpu().long().numpy(), spec.cpu().numpy()
    _require_bands(m, on, on, frames, bins, "fbank_geometry")
    ok = _crops_inside(*c.T, frames, bins)
    _require(ok, lambda: f"fbank_geometry: crops must lie inside the image, got {c.tolist()}")
    params = np.zeros((batch, 10), np.float32)
    params[:, 0] = on
    params[:, 1:5] = np.where(on[:, None], m, 0)  # off: empty masks and no shift
    params[:, 5] = np.where(on, shift.cpu().numpy(), 0)
    params[:, 6:10] = c
    return fused.fbank_geometry_triton(x, torch.from_numpy(params))


@_float32_kernel
def roll_and_mask(x: torch.Tensor, shift: Param, masks: Param, fill: float = 0.0) -> torch.Tensor:
    """Finetuning's augmentation of (B, 1, T, F) filterbank images: per sample the time roll by
    shift (B,) (``roll``), then SpecAugment's time and frequency masks, (B, 4) [time start, end,
    frequency start, end] in the rolled image (``mask_rows``; an empty band masks nothing), set
    to ``fill``. Returns a new tensor; on a GPU one fused launch (``kernels.augment_triton``),
    bit for bit the same (data movement only)."""
    batch, channels, frames, bins = x.shape
    if channels != 1:
        raise ValueError(f"roll_and_mask needs one-channel images, got {channels} channels")
    masks = torch.as_tensor(masks)
    if masks.shape != (batch, 4):
        raise ValueError(f"masks must have shape ({batch}, 4), got {tuple(masks.shape)}")
    shift = _param(shift, batch, "shift", torch.long)
    if not fused.fused_path(x):
        x = roll(x, shift, 2, shift != 0)  # a new tensor: the masks may write into it
        x = mask_rows(
            x, masks[:, 0], masks[:, 1], 2, masks[:, 1] > masks[:, 0], owned=True, fill=fill
        )
        return mask_rows(
            x, masks[:, 2], masks[:, 3], 3, masks[:, 3] > masks[:, 2], owned=True, fill=fill
        )
    # mask_rows' checks, in numpy on the host (no device op, no sync).
    m = masks.cpu().long().numpy()
    time_on, freq_on = m[:, 1] > m[:, 0], m[:, 3] > m[:, 2]
    _require_bands(m, time_on, freq_on, frames, bins, "roll_and_mask")
    m[~time_on, :2], m[~freq_on, 2:] = 0, 0
    params = np.zeros((batch, 5), np.int32)
    params[:, 0] = np.remainder(shift.cpu().numpy(), frames)  # torch.roll's shift, in [0, T)
    params[:, 1:] = m
    return fused.roll_mask_triton(x, torch.from_numpy(params), fill=fill)


def _require_bands(m: np.ndarray, time_on, freq_on, frames: int, bins: int, who: str) -> None:
    """``mask_rows``' check of SpecAugment bands m (B, 4) [time start, end, frequency start,
    end] on a (frames, bins) image, on the host, for the samples whose band is on."""
    for (a, b), on, length, name in (
        ((0, 1), time_on, frames, "time"),
        ((2, 3), freq_on, bins, "frequency"),
    ):
        ok = _bands_inside(m[:, a], m[:, b], length)
        _require(ok | ~on, f"{who}: {name} masks need 0 <= start <= end <= {length}")


def _spatial_axis(axis: int) -> int:
    """Axis 2 (H) or 3 (W) of a (B, C, H, W) batch; -2 and -1 are accepted too."""
    if axis not in (2, 3, -2, -1):
        raise ValueError(f"axis must be 2 (H, time) or 3 (W, frequency), got {axis}")
    return axis % 4


# ------------------------------------------------------------------------------------------------
# Colour (torchvision's float tensor formulas)
# ------------------------------------------------------------------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma with torchvision's weights and summation order. A
    one-channel x is a grey image stored once: the same sum with r = g = b (not simply x, since
    the weights add up to 0.9999 in float32)."""
    r, g, b = x.unbind(1) if x.shape[1] == 3 else (x[:, 0],) * 3
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * a + (1 - ratio) * b clamped to [0, 1], ratio (n,) per sample."""
    r = _column(ratio)
    return (r * a + (1.0 - r) * b).clamp(0.0, 1.0)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision blends with zeros; the (1 - factor) * 0 term adds only a signed zero.
    return (_column(factor) * x).clamp(0.0, 1.0)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's (Pillow's) RGB -> HSV on (n, 3, H, W); h in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    flat = maxc == minc  # grey pixels: s = h = 0; the divisors below are then set to 1
    span = maxc - minc
    ones = torch.ones_like(maxc)
    s = span / torch.where(flat, ones, maxc)
    divisor = torch.where(flat, ones, span)
    rc = (maxc - r) / divisor
    gc = (maxc - g) / divisor
    bc = (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torchvision's HSV -> RGB: p, q, t are clamped to [0, 1], v is not."""
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = torch.remainder(sector.to(torch.int64), 6)
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    candidates = torch.stack((v, q, p, t), 1)  # (n, 4, H, W)
    # The candidate index of r, g, b: two bits per sector in one integer per channel, shifted
    # out elementwise (indexing the (6, 3) table with the sector map cost a CPU ~10x more).
    codes = _sector_codes(h.device).view(1, 3, 1, 1)
    pick = torch.bitwise_right_shift(codes, 2 * sector.unsqueeze(1)).bitwise_and_(3)
    return torch.gather(candidates, 1, pick)


@functools.lru_cache(maxsize=8)
def _sector_codes(device: torch.device) -> torch.Tensor:
    """Per channel, ``_HSV_SECTORS``' column packed as 2 bits per sector (sector k at bit 2k)."""
    codes = [sum(row[c] << (2 * k) for k, row in enumerate(_HSV_SECTORS)) for c in range(3)]
    return torch.tensor(codes, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=8)
def _sector_table(device: torch.device) -> torch.Tensor:
    """``_HSV_SECTORS`` as a (6, 3) tensor on ``device``, made once per device."""
    return torch.tensor(_HSV_SECTORS, device=device)


def _hue_general(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def _hue_grey(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The same function for images whose three channels are equal (the filterbank image).

    Every pixel is grey, so torchvision's HSV is (0, 0, v = x) and its p, q, t all equal
    clamp(x, 0, 1): each output channel is either x itself or clamp(x, 0, 1), as the sector of
    the shifted hue picks (with hue factors in [-0.1, 0.1]: red x, green and blue clamped). The
    sector is computed with the general path's float32 operations, so the result is identical;
    it costs one clamp instead of the full colour-space round trip (16 ms -> <1 ms per 3x1024x128
    image on a CPU core, the largest cost of the audio augmentation).
    """
    h = torch.remainder(torch.zeros_like(factor) + factor, 1.0)
    sector = torch.remainder(torch.floor(h * 6.0).to(torch.int64), 6)
    table = _sector_table(x.device)
    keep = (table[sector] == 0).view(-1, 3, 1, 1)  # candidate 0 is v, the unclamped value
    return torch.where(keep, x, x.clamp(0.0, 1.0))


def _hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        # A grey image stored once, in [0, 1] (color_jitter's one-channel contract): p, q, t and v
        # all equal x, whatever the sector.
        return x.clamp(0.0, 1.0)
    if x.is_cuda:
        # Which images are grey is known only on the device: asking would make the host wait
        # for the GPU. The general formula gives grey images the same result (see _hue_grey).
        return _hue_general(x, factor)
    grey = ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1)
    if bool(grey.all()):
        return _hue_grey(x, factor)
    if not bool(grey.any()):
        return _hue_general(x, factor)
    out = torch.empty_like(x)
    out[grey] = _hue_grey(x[grey], factor[grey])
    out[~grey] = _hue_general(x[~grey], factor[~grey])
    return out


_COLOUR_OPS = (_brightness, _contrast, _saturation, _hue)
_COLOUR_NAMES = ("brightness", "contrast", "saturation", "hue")


def _check_factor(op: int, factor, mask) -> None:
    """torchvision's ranges: brightness/contrast/saturation >= 0, hue in [-0.5, 0.5] (torch
    tensors or numpy arrays)."""
    ok = abs(factor) <= 0.5 if op == 3 else factor >= 0
    wanted = "in [-0.5, 0.5]" if op == 3 else ">= 0"
    _require(
        ok | ~mask, lambda: f"{_COLOUR_NAMES[op]} factors must be {wanted}, got {factor.tolist()}"
    )


def _colour(x: torch.Tensor, op: int, factor: Param, active: Param | None) -> torch.Tensor:
    batch, channels = x.shape[:2]
    if channels != 3:
        raise ValueError(f"adjust_{_COLOUR_NAMES[op]} needs 3 channels, got {channels}")
    factor = _param(factor, batch, f"{_COLOUR_NAMES[op]} factor", torch.float32)
    mask = _active(active, batch).to(factor.device)
    _check_factor(op, factor, mask)
    return _apply(x, mask, _COLOUR_OPS[op], factor)


@_float32_kernel
def adjust_brightness(x: torch.Tensor, factor: Param, active: Param | None = None) -> torch.Tensor:
    """torchvision ``adjust_brightness`` per sample: factor * x, clamped to [0, 1]."""
    return _colour(x, 0, factor, active)


@_float32_kernel
def adjust_contrast(x: torch.Tensor, factor: Param, active: Param | None = None) -> torch.Tensor:
    """torchvision ``adjust_contrast`` per sample: blend with the image's grayscale mean."""
    return _colour(x, 1, factor, active)


@_float32_kernel
def adjust_saturation(x: torch.Tensor, factor: Param, active: Param | None = None) -> torch.Tensor:
    """torchvision ``adjust_saturation`` per sample: blend with the grayscale image."""
    return _colour(x, 2, factor, active)


@_float32_kernel
def adjust_hue(x: torch.Tensor, factor: Param, active: Param | None = None) -> torch.Tensor:
    """torchvision ``adjust_hue`` per sample (factor in [-0.5, 0.5]): shift h in HSV space."""
    return _colour(x, 3, factor, active)


@_float32_kernel
def color_jitter(
    x: torch.Tensor,
    order: torch.Tensor,
    factors: torch.Tensor,
    active: Param | None = None,
    *,
    owned: bool = False,
) -> torch.Tensor:
    """Colour jitter with each sample's own order of the four adjustments.

    order (B, 4) long: a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue per sample;
    factors (B, 4) float: [brightness, contrast, saturation, hue] as applied (not the recorded
    ``factor - 1``). Equal to torchvision's adjust_* applied one after another in that order.

    A one-channel x stands for a grey image with three equal channels (the filterbank image), at a
    third of the cost. Brightness, contrast and saturation keep such an image grey and clamp it to
    [0, 1], where hue leaves grey pixels unchanged; hue first on values outside [0, 1] would not
    (it clamps two channels of three), so each active sample must have hue after another op.
    """
    batch, channels = x.shape[:2]
    if channels not in (1, 3):
        raise ValueError(f"color_jitter needs 3 channels (or 1 for a grey image), got {channels}")
    order = torch.as_tensor(order)
    factors = torch.as_tensor(factors)
    if order.shape != (batch, 4) or factors.shape != (batch, 4):
        raise ValueError(
            f"order and factors must have shape ({batch}, 4), got "
            f"{tuple(order.shape)} and {tuple(factors.shape)}"
        )
    # The control logic runs in numpy on the host: ~90 small torch ops per call before, which a
    # GPU stage's host thread paid for (parameters on a device are read once here).
    order = order.long().cpu().numpy()
    factors = factors.float().cpu().numpy()
    mask = _active(active, batch).cpu().numpy()
    _require(
        (np.sort(order, 1) == np.arange(4)).all(1) | ~mask,
        lambda: f"color_jitter: each order row must be a permutation of 0..3, got {order.tolist()}",
    )
    for op in range(4):
        _check_factor(op, factors[:, op], mask)
    if channels == 1:
        _require(
            (order[:, 0] != 3) | ~mask,
            "color_jitter on a one-channel (grey) image: hue first would make the channels "
            "differ; pass those samples with three channels",
        )
    if fused.fused_path(x):  # a GPU: one fused kernel instead of ~60 ops per call
        return fused.color_jitter_triton(x, order, factors, mask, owned=owned)
    # Position by position, each op goes to the samples that have it there.
    chosen = mask[None, None, :] & (order.T[:, None, :] == np.arange(4)[None, :, None])
    out = x
    for pos, op in zip(*np.nonzero(chosen.any(2)), strict=True):  # (pos, op) in order
        mine = owned or out is not x
        factor = torch.from_numpy(np.ascontiguousarray(factors[:, op]))
        out = _apply(out, torch.from_numpy(chosen[pos, op]), _COLOUR_OPS[op], factor, owned=mine)
    return out if out is not x or owned else x.clone()


@_float32_kernel
def grayscale(x: torch.Tensor, active: Param | None = None, *, owned: bool = False) -> torch.Tensor:
    """torchvision ``rgb_to_grayscale(num_output_channels=3)`` for the active samples."""
    if x.shape[1] != 3:
        raise ValueError(f"grayscale needs 3 channels, got {x.shape[1]}")
    gray = lambda s: _gray(s).expand(s.shape).contiguous()  # noqa: E731
    return _apply(x, _active(active, x.shape[0]), gray, owned=owned)


@_float32_kernel
def normalize(x: torch.Tensor, mean: Param, std: Param, *, owned: bool = False) -> torch.Tensor:
    """(x - mean[c]) / std[c] per channel (torchvision ``F.normalize``)."""
    channels = x.shape[1]
    mean = torch.as_tensor(mean, dtype=torch.float32)
    std = torch.as_tensor(std, dtype=torch.float32)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"mean and std must have {channels} values each")
    _require(std != 0, lambda: f"normalize: std must be non-zero, got {std.tolist()}")
    mean, std = to_device(mean, x.device), to_device(std, x.device)
    if owned:
        return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


@_float32_kernel
def finish_visual(
    x: torch.Tensor, flip: Param, gray: Param, mean: Param, std: Param, *, owned: bool = False
) -> torch.Tensor:
    """The end of the augmented visual view: ``hflip`` where flip (B,) is set, ``grayscale``
    where gray (B,) is set, then ``normalize``. On a GPU one fused launch (the same numbers:
    the same float32 operations), elsewhere the three kernels."""
    batch, channels = x.shape[:2]
    if channels != 3:
        raise ValueError(f"finish_visual needs 3 channels, got {channels}")
    flip, gray = _active(flip, batch), _active(gray, batch)
    mean32 = torch.as_tensor(mean, dtype=torch.float32)
    std32 = torch.as_tensor(std, dtype=torch.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError("mean and std must have 3 values each")
    _require(std32 != 0, lambda: f"finish_visual: std must be non-zero, got {std32.tolist()}")
    if fused.fused_path(x):
        flip, gray = flip.cpu().numpy(), gray.cpu().numpy()
        return fused.finish_visual_triton(x, flip, gray, mean32.tolist(), std32.tolist())
    x = hflip(x, flip, owned=owned)  # a new tensor unless owned: ours from here on
    x = grayscale(x, gray, owned=True)
    return normalize(x, mean32, std32, owned=True)


def flip_transpose_into(
    out: torch.Tensor, rows: Param | None, x: torch.Tensor, flip: Param
) -> None:
    """out[rows] = hflip(x, flip).transpose(2, 3), x (n, 1 or 3, T, F) broadcast over the three
    channels of out (B, 3, F, T) (rows None: all n == B rows): the augmented audio view's flip
    and its write into the model's layout. x may be overwritten. On a GPU one fused launch (pure
    data movement: the same values); on a CPU the flip, then one 2-D copy per image, which
    takes torch's blocked transpose (a 4-D transposing copy ran ~4x slower)."""
    n, channels, frames, bins = x.shape
    if out.dim() != 4 or out.shape[1:] != (3, bins, frames) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous (B, 3, {bins}, {frames}) tensor")
    if channels not in (1, 3) or x.dtype != out.dtype:
        raise ValueError(f"x must have 1 or 3 channels and out's dtype, got {tuple(x.shape)}")
    # Host indices, checked in numpy (torch ops on them would cost a GPU stage host time).
    index = np.arange(n) if rows is None else np.asarray(torch.as_tensor(rows).cpu(), np.int64)
    if index.shape != (n,) or (n and (index.min() < 0 or index.max() >= len(out))):
        raise ValueError(f"rows must be {n} indices into out's {len(out)} rows")
    if rows is None and n != len(out):
        raise ValueError(f"rows None means all of out's {len(out)} rows, x has {n}")
    flip = _active(flip, n)
    if fused.fused_path(x):
        fused.flip_transpose_triton(out, index, x, flip.cpu().numpy())
        return
    x = hflip(x, flip, owned=True)
    if whole_batch_ops(out):
        if rows is None:
            out.copy_(x.transpose(2, 3).expand_as(out))
        else:
            out[to_device(torch.from_numpy(index), out.device)] = x.transpose(2, 3)
        return
    for i, row in enumerate(index.tolist()):
        for c in range(channels):
            out[row, c].copy_(x[i, c].t())
        if channels == 1:
            out[row, 1:].copy_(out[row, :1].expand(2, -1, -1))


# ------------------------------------------------------------------------------------------------
# Gaussian blur
# ------------------------------------------------------------------------------------------------


def _kernel_size(sigma: torch.Tensor | float, scale: float) -> torch.Tensor | int:
    # float64, as Python's math.ceil on the same number: float32 arithmetic could round 3 * sigma
    # down onto an integer (sigma = float32(1/3)) and change the size.
    if isinstance(sigma, torch.Tensor):
        return 2 * torch.ceil(sigma.double() * scale).long() + 1
    return 2 * math.ceil(float(sigma) * scale) + 1


def audio_blur_kernel_size(sigma: torch.Tensor | float) -> torch.Tensor | int:
    """Audio blur kernel size 2 * ceil(sigma) + 1 (spec), per sample for a tensor."""
    return _kernel_size(sigma, 1.0)


def visual_blur_kernel_size(sigma: torch.Tensor | float) -> torch.Tensor | int:
    """Visual blur kernel size 2 * ceil(3 sigma) + 1 (spec), per sample for a tensor."""
    return _kernel_size(sigma, 3.0)


def _gaussian_kernels(
    sigma: torch.Tensor, size: int, own: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, size) 1-D Gaussians on the integer offsets around the centre, each summing to 1.

    ``own`` (n,): each sample's own (smaller or equal) odd size; its kernel is that size's,
    zero-padded to ``size`` (the zero taps add exact zeros to a convolution's sums).
    """
    half = (size - 1) * 0.5
    offsets = torch.linspace(-half, half, steps=size, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (offsets / sigma[:, None]).pow(2))
    if own is not None:
        pdf = torch.where(offsets.abs() <= (own // 2)[:, None], pdf, 0.0)
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_kernels_host(
    sigma: np.ndarray, sizes: np.ndarray, active: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``_gaussian_kernels`` in float32 numpy on the host, for the fused blur: ((n, K) weights,
    each active sample's own odd size zero-padded to the largest K, and (n,) sizes, 1 for
    inactive samples). numpy's exp may round a weight one ulp apart from torch's."""
    own = np.where(active, sizes, 1).astype(np.int64)
    sigma = np.where(active, sigma, 1.0).astype(np.float32)
    half = int(own.max()) // 2
    offsets = np.arange(-half, half + 1).astype(np.float32)
    pdf = np.exp(np.float32(-0.5) * np.square(offsets / sigma[:, None]))
    pdf = np.where(np.abs(offsets) <= (own // 2)[:, None], pdf, np.float32(0.0))
    return (pdf / pdf.sum(1, keepdims=True)).astype(np.float32), own


def _blur(
    x: torch.Tensor, sigma: torch.Tensor, own: torch.Tensor | None = None, *, size: int
) -> torch.Tensor:
    """Blur (n, C, H, W) with per-sample sigma and one kernel size (or per-sample sizes ``own``
    up to ``size``): reflect pad, then the vertical and the horizontal 1-D pass as depthwise
    convolutions over n * C channels."""
    n, c, h, w = x.shape
    kernels = _gaussian_kernels(sigma, size, own).repeat_interleave(c, 0)  # (n * C, size)
    pad = size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels.view(n * c, 1, size, 1), groups=n * c)
    y = F.conv2d(y, kernels.view(n * c, 1, 1, size), groups=n * c)
    return y.view(n, c, h, w)


@_float32_kernel
def gaussian_blur(
    x: torch.Tensor,
    sigma: Param,
    kernel_size: Param,
    active: Param | None = None,
    *,
    owned: bool = False,
) -> torch.Tensor:
    """torchvision ``F.gaussian_blur(x[b], [k, k], [s, s])`` per active sample.

    kernel_size (B,) odd positive integers (see ``audio_blur_kernel_size`` and
    ``visual_blur_kernel_size``); samples are grouped by kernel size, one pair of convolutions per
    group. Reflect padding needs k // 2 < H and W.
    """
    batch, _, h, w = x.shape
    sigma = _param(sigma, batch, "sigma", torch.float32)
    sizes = _param(kernel_size, batch, "kernel_size", torch.long).to(sigma.device)
    mask = _active(active, batch).to(sigma.device)
    fused_path = fused.fused_path(x)
    # The checks run in numpy on the fused (GPU) path: ~25 fewer host ops per call.
    sig, siz, on = (
        (sigma.cpu().numpy(), sizes.cpu().numpy(), mask.cpu().numpy())
        if fused_path
        else (sigma, sizes, mask)
    )
    _require((sig > 0) | ~on, lambda: f"gaussian_blur: sigma must be > 0, got {sig.tolist()}")
    ok = (siz > 0) & (siz % 2 == 1) & (siz // 2 < min(h, w))
    _require(ok | ~on, f"gaussian_blur: kernel sizes must be odd, positive and fit {h}x{w}")
    if fused_path:
        # A GPU: two fused passes, each sample with its own kernel (was ~40 ops per call).
        if not on.any():
            return x if owned else x.clone()
        weights, own = gaussian_kernels_host(sig, siz, on)
        return fused.gaussian_blur_triton(x, weights, own, on, owned=owned)
    out = x
    if whole_batch_ops(x):
        # One whole-batch pass for every size (each sample's kernel zero-padded to the largest),
        # not one per distinct size: the visual sizes 3..13 made up to 6 passes and ~90 launches.
        if bool(mask.any()):
            blur = functools.partial(_blur, size=int(sizes[mask].max()))
            out = _apply(x, mask, blur, sigma, sizes, owned=owned)
        return out if out is not x or owned else x.clone()
    for size in torch.unique(sizes[mask]).tolist():
        blur = functools.partial(_blur, size=size)
        chosen = mask & (sizes == size)
        out = _apply(out, chosen, blur, sigma, owned=owned or out is not x, gather=True)
    return out if out is not x or owned else x.clone()
