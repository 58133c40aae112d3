"""Fused Triton kernels: the GPU paths of ``kernels.augment``'s ``color_jitter``,
``gaussian_blur``, ``fbank_geometry``, ``roll_and_mask``, ``finish_visual`` and
``flip_transpose_into``.

Why: the torch paths apply per-sample parameters as sequences of whole-batch ops; on a GPU that
is hundreds of small launches per pretraining batch (colour jitter ~60 per call, hue alone ~38;
blur ~40 per call), and the loader's device stage is bound by the host's launch time. Here a
colour jitter or a blur is two launches, the audio view's masks, roll and crop one, whatever
the samples' parameters. The kernels are
taken for CUDA tensors when triton is importable (``fused_path``); the CPU keeps the torch paths.

Colour jitter: two launches, each one program per (image, tile of 1024 pixels). The first
(active samples only) applies the ops that come before contrast and sums each tile's grayscale
pixels for contrast's mean; the second sums an image's tile sums (every tile in the same order),
applies all four ops in the sample's order and writes the result. Every adjustment is pointwise
except contrast's mean, so nothing else needs the whole image.

Blur: a vertical and a horizontal pass, each one program per (image plane, tile), each sample
with its own normalised 1-D Gaussian (made on the host, as the torch path makes it) and kernel
size, reflect padding by index arithmetic (no padded copy).

Filterbank geometry: one program per (image, tile) reads, for each output pixel, the four
bilinear taps of its crop position straight from the unmasked, unrolled image (mask and roll
are index arithmetic), so SpecAugment's masks, the time roll and the resized crop are one pass.
Visual finish: flip (a mirrored read), grayscale and normalisation in one pass per tile.
Finetuning's roll and masks: one pass per tile, the roll a shifted read, the masks a select.

Numerics: the same float32 operations in the same order as the torch path (torchvision's
formulas), with IEEE division (``div_rn``; Triton's ``/`` is approximate on NVIDIA GPUs), NaN
propagating min/max as torch's clamp, compiled without fused multiply-adds
(``enable_fp_fusion=False``), so every op rounds as torch's separate kernels do. Differences:
contrast's mean and the blur's tap sums run in another order (a few ulp); the geometry is
plain bilinear where torchvision's resize is antialiased (the same taps for these upsampling
crops, weights rounded differently: ~5e-7); libdevice's division and floor flush denormals
(values below 1.2e-38, which these images never hold).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from kernels import triton_interpreting
from kernels.transfer import to_device

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton: the torch path is used everywhere
    triton = None

# Per sample: [active, op at position 0..3, brightness, contrast, saturation, hue, contrast's
# position], as float32 (small integers are exact).
_PARAMS = 10
_BLOCK = 1024
_NUM_WARPS = 4


def fused_path(x: torch.Tensor) -> bool:
    """Whether ``kernels.augment`` takes these kernels for x: on a CUDA tensor when triton is
    importable (the torch paths otherwise)."""
    return triton is not None and x.is_cuda


def _require_backend(name: str, x: torch.Tensor) -> None:
    """Raise unless ``name``'s kernel can run on x: triton importable, x on CUDA (or a CPU
    tensor under the interpreter)."""
    if triton is None:
        raise RuntimeError(f"{name} needs triton, which is not importable")
    if not x.is_cuda and not triton_interpreting():
        raise ValueError(f"{name} needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")


def _launch(kernel, grid: tuple[int, ...], x: torch.Tensor, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on x's device, compiled without fused multiply-adds
    (every op rounds as torch's separate kernels do)."""
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta, num_warps=_NUM_WARPS, enable_fp_fusion=False)


if triton is not None:

    @triton.jit
    def _clamp01(v):
        zero = tl.full(v.shape, 0.0, tl.float32)
        one = tl.full(v.shape, 1.0, tl.float32)
        return tl.minimum(tl.maximum(v, zero, tl.PropagateNan.ALL), one, tl.PropagateNan.ALL)

    @triton.jit
    def _gray(r, g, b):
        # torchvision's rgb_to_grayscale weights and summation order (kernels.augment.GRAY_WEIGHTS).
        return 0.2989 * r + 0.587 * g + 0.114 * b

    @triton.jit
    def _blend(a, b, ratio):
        return _clamp01(ratio * a + (1.0 - ratio) * b)

    @triton.jit
    def _pick(sector, s0, s1, s2, s3, s4, s5):
        """The candidate of each pixel's hue sector (0..5)."""
        out = tl.where(sector == 0, s0, s5)
        out = tl.where(sector == 1, s1, out)
        out = tl.where(sector == 2, s2, out)
        out = tl.where(sector == 3, s3, out)
        return tl.where(sector == 4, s4, out)

    @triton.jit
    def _hue(r, g, b, factor):
        """torchvision's adjust_hue: RGB -> HSV, shift h, back (``augment._hue_general``)."""
        maxc = tl.maximum(tl.maximum(r, g, tl.PropagateNan.ALL), b, tl.PropagateNan.ALL)
        minc = tl.minimum(tl.minimum(r, g, tl.PropagateNan.ALL), b, tl.PropagateNan.ALL)
        flat = maxc == minc
        span = maxc - minc
        s = tl.div_rn(span, tl.where(flat, 1.0, maxc))
        divisor = tl.where(flat, 1.0, span)
        rc = tl.div_rn(maxc - r, divisor)
        gc = tl.div_rn(maxc - g, divisor)
        bc = tl.div_rn(maxc - b, divisor)
        h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
        # fmod(h / 6 + 1, 1): the argument lies in [5/6, 11/6], where a - floor(a) is exact.
        h = tl.div_rn(h, 6.0) + 1.0
        h = h - tl.floor(h)
        # remainder(h + factor, 1): a - floor(a) rounds as torch's remainder does.
        h = h + factor
        h = h - tl.floor(h)
        h6 = h * 6.0
        sector_f = tl.floor(h6)
        f = h6 - sector_f
        sector = sector_f.to(tl.int32) % 6  # h in [0, 1]: sector_f >= 0
        v = maxc
        p = _clamp01(v * (1.0 - s))
        q = _clamp01(v * (1.0 - s * f))
        t = _clamp01(v * (1.0 - s * (1.0 - f)))
        return (
            _pick(sector, v, q, p, p, t, v),
            _pick(sector, t, v, v, q, p, p),
            _pick(sector, p, p, t, v, v, q),
        )

    @triton.jit
    def _adjust(r, g, b, op, factor, mean, CHANNELS: tl.constexpr):
        """One adjustment (0 brightness, 1 contrast, 2 saturation, 3 hue) on a block of pixels."""
        if op == 0:
            # torchvision blends with zeros; the (1 - factor) * 0 term adds only a signed zero.
            r = _clamp01(factor * r)
            g = _clamp01(factor * g)
            b = _clamp01(factor * b)
        elif op == 1:
            r = _blend(r, mean, factor)
            g = _blend(g, mean, factor)
            b = _blend(b, mean, factor)
        elif op == 2:
            gray = _gray(r, g, b)
            r = _blend(r, gray, factor)
            g = _blend(g, gray, factor)
            b = _blend(b, gray, factor)
        else:
            if CHANNELS == 1:
                # A grey image stored once: hue leaves grey pixels at clamp(v) in every channel
                # (color_jitter refuses hue first here, so the values are already in [0, 1]).
                r = _clamp01(r)
                g = r
                b = r
            else:
                r, g, b = _hue(r, g, b, factor)
        return r, g, b

    @triton.jit
    def _load_rgb(image, idx, stride_c, inside, CHANNELS: tl.constexpr):
        """A block of pixels' (r, g, b); a one-channel (grey) image gives its values thrice."""
        r = tl.load(image + idx, mask=inside, other=0.0)
        if CHANNELS == 3:
            g = tl.load(image + stride_c + idx, mask=inside, other=0.0)
            b = tl.load(image + 2 * stride_c + idx, mask=inside, other=0.0)
        else:
            g = r
            b = r
        return r, g, b

    @triton.jit
    def _jitter_mean_kernel(
        x_ptr,
        partial_ptr,
        params_ptr,
        pixels,
        stride_b,
        stride_c,
        tiles,
        CHANNELS: tl.constexpr,
        BLOCK: tl.constexpr,
        PARAMS: tl.constexpr,
    ):
        """Pass 1, one program per (image, tile of BLOCK pixels): the tile's sum of the grayscale
        image as contrast finds it (the ops before contrast applied), into partial[image, tile]."""
        row = tl.program_id(0)
        tile = tl.program_id(1)
        params = params_ptr + row * PARAMS
        if tl.load(params) > 0.5:
            ops0 = tl.load(params + 1).to(tl.int32)
            ops1 = tl.load(params + 2).to(tl.int32)
            ops2 = tl.load(params + 3).to(tl.int32)
            contrast_at = tl.load(params + 9).to(tl.int32)
            idx = tile * BLOCK + tl.arange(0, BLOCK)
            inside = idx < pixels
            x_img = x_ptr + row.to(tl.int64) * stride_b
            r, g, b = _load_rgb(x_img, idx, stride_c, inside, CHANNELS)
            if contrast_at > 0:
                r, g, b = _adjust(r, g, b, ops0, tl.load(params + 5 + ops0), 0.0, CHANNELS)
            if contrast_at > 1:
                r, g, b = _adjust(r, g, b, ops1, tl.load(params + 5 + ops1), 0.0, CHANNELS)
            if contrast_at > 2:
                r, g, b = _adjust(r, g, b, ops2, tl.load(params + 5 + ops2), 0.0, CHANNELS)
            total = tl.sum(tl.where(inside, _gray(r, g, b), 0.0), axis=0)
            tl.store(partial_ptr + row * tiles + tile, total)

    @triton.jit
    def _jitter_kernel(
        x_ptr,
        out_ptr,
        params_ptr,
        partial_ptr,
        pixels,
        stride_b,
        stride_c,
        tiles,
        CHANNELS: tl.constexpr,
        BLOCK: tl.constexpr,
        TILES: tl.constexpr,
        COPY_INACTIVE: tl.constexpr,
        PARAMS: tl.constexpr,
    ):
        """Pass 2, one program per (image, tile): the image's mean from pass 1's partial sums
        (summed in the same fixed order by every tile), then the four adjustments in the
        sample's order. TILES: a power of two >= tiles."""
        row = tl.program_id(0)
        tile = tl.program_id(1)
        params = params_ptr + row * PARAMS
        x_img = x_ptr + row.to(tl.int64) * stride_b
        out_img = out_ptr + row.to(tl.int64) * stride_b
        idx = tile * BLOCK + tl.arange(0, BLOCK)
        inside = idx < pixels
        if tl.load(params) > 0.5:
            ops0 = tl.load(params + 1).to(tl.int32)
            ops1 = tl.load(params + 2).to(tl.int32)
            ops2 = tl.load(params + 3).to(tl.int32)
            ops3 = tl.load(params + 4).to(tl.int32)
            parts = tl.arange(0, TILES)
            sums = tl.load(partial_ptr + row * tiles + parts, mask=parts < tiles, other=0.0)
            mean = tl.div_rn(tl.sum(sums, axis=0), pixels.to(tl.float32))
            r, g, b = _load_rgb(x_img, idx, stride_c, inside, CHANNELS)
            r, g, b = _adjust(r, g, b, ops0, tl.load(params + 5 + ops0), mean, CHANNELS)
            r, g, b = _adjust(r, g, b, ops1, tl.load(params + 5 + ops1), mean, CHANNELS)
            r, g, b = _adjust(r, g, b, ops2, tl.load(params + 5 + ops2), mean, CHANNELS)
            r, g, b = _adjust(r, g, b, ops3, tl.load(params + 5 + ops3), mean, CHANNELS)
            tl.store(out_img + idx, r, mask=inside)
            if CHANNELS == 3:
                tl.store(out_img + stride_c + idx, g, mask=inside)
                tl.store(out_img + 2 * stride_c + idx, b, mask=inside)
        else:
            if COPY_INACTIVE:
                for c in tl.static_range(CHANNELS):
                    plane = c * stride_c + idx
                    tl.store(out_img + plane, tl.load(x_img + plane, mask=inside), mask=inside)


def color_jitter_triton(
    x: torch.Tensor,
    order: np.ndarray,
    factors: np.ndarray,
    active: np.ndarray,
    *,
    owned: bool = False,
    block: int | None = None,
) -> torch.Tensor:
    """Colour jitter of a (B, C, H, W) float32 batch, C = 3 or 1 (a grey image stored once).

    order (B, 4) int, factors (B, 4) float32 as applied, active (B,) bool: host arrays that
    ``kernels.augment.color_jitter`` has already checked (call that, not this). ``owned``: x
    may be overwritten. ``block``: pixels per program (a power of two; default 1024 on a GPU,
    8192 under the interpreter, whose cost is per program).
    """
    _require_backend("color_jitter_triton", x)
    batch, channels, height, width = x.shape
    if channels not in (1, 3):
        raise ValueError(f"color_jitter_triton needs 1 or 3 channels, got {channels}")
    params = np.zeros((batch, _PARAMS), np.float32)
    params[:, 0] = active
    params[:, 1:5] = order
    params[:, 5:9] = factors
    params[:, 9] = np.argmax(np.asarray(order) == 1, axis=1)  # contrast's position
    source = x.contiguous()
    in_place = owned or source is not x  # a contiguous copy is ours too
    out = source if in_place else torch.empty_like(source)
    if batch == 0 or height * width == 0:
        return out
    pixels = height * width
    block = block or (8192 if triton_interpreting() else _BLOCK)
    tiles = -(-pixels // block)
    # Every tile of an image needs the image's whole mean: the sums go through a small buffer
    # between two launches (one program per image instead kept 16 of an H100's 132 SMs busy:
    # 2.3 ms per pretraining batch on an H200).
    partial = torch.empty((batch, tiles), dtype=torch.float32, device=x.device)
    params_dev = to_device(torch.from_numpy(params), x.device)
    common = (pixels, source.stride(0), source.stride(1), tiles)
    meta = {"CHANNELS": channels, "BLOCK": block, "PARAMS": _PARAMS}
    _launch(_jitter_mean_kernel, (batch, tiles), x, source, partial, params_dev, *common, **meta)
    _launch(
        _jitter_kernel,
        (batch, tiles),
        x,
        source,
        out,
        params_dev,
        partial,
        *common,
        **meta,
        TILES=triton.next_power_of_2(tiles),
        COPY_INACTIVE=not in_place,
    )
    return out


if triton is not None:

    @triton.jit
    def _reflect(i, length):
        """torch's reflect padding as an index map: -1 -> 1, length -> length - 2 (pad < length)."""
        i = tl.where(i < 0, -i, i)
        return tl.where(i >= length, 2 * (length - 1) - i, i)

    @triton.jit
    def _blur_kernel(
        src_ptr,
        dst_ptr,
        orig_ptr,
        params_ptr,
        channels,
        height,
        width,
        stride_b,
        stride_c,
        kmax,
        VERTICAL: tl.constexpr,
        COPY_INACTIVE: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """One 1-D pass of the blur over a (BLOCK_H, BLOCK_W) tile of one image plane."""
        plane = tl.program_id(0)
        row = plane // channels
        params = params_ptr + row * (kmax + 2)
        base = row.to(tl.int64) * stride_b + (plane % channels).to(tl.int64) * stride_c
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        inside = (rows < height)[:, None] & (cols < width)[None, :]
        here = base + rows[:, None] * width + cols[None, :]
        if tl.load(params) > 0.5:
            size = tl.load(params + 1).to(tl.int32)
            pad = size // 2
            first = kmax // 2 - pad  # the sample's taps sit in the middle of its weight row
            acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
            for k in range(0, size):
                weight = tl.load(params + 2 + first + k)
                if VERTICAL:
                    source = _reflect(rows + (k - pad), height)[:, None] * width + cols[None, :]
                else:
                    source = rows[:, None] * width + _reflect(cols + (k - pad), width)[None, :]
                acc += weight * tl.load(src_ptr + base + source, mask=inside, other=0.0)
            tl.store(dst_ptr + here, acc, mask=inside)
        else:
            if COPY_INACTIVE:
                tl.store(dst_ptr + here, tl.load(orig_ptr + here, mask=inside), mask=inside)


def gaussian_blur_triton(
    x: torch.Tensor,
    weights: np.ndarray,
    sizes: np.ndarray,
    active: np.ndarray,
    *,
    owned: bool = False,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Separable Gaussian blur of a (B, C, H, W) float32 batch, each sample with its own kernel.

    Host arrays: weights (B, K) float32, each sample's normalised 1-D kernel of its own odd size
    ``sizes`` (B,), zero-padded on both sides to the largest size K; active (B,) bool. Reflect
    padding needs size // 2 < H and W. ``kernels.augment.gaussian_blur`` checks the parameters
    and makes the weights (``gaussian_kernels_host``; call that, not this). ``owned``: x may be
    overwritten. ``tile``: (rows, columns) per program, powers of two (default (16, 64) on a
    GPU, (256, 256) under the interpreter).
    """
    _require_backend("gaussian_blur_triton", x)
    batch, channels, height, width = x.shape
    kmax = weights.shape[1]
    params = np.empty((batch, kmax + 2), np.float32)
    params[:, 0] = active
    params[:, 1] = sizes
    params[:, 2:] = weights
    source = x.contiguous()
    in_place = owned or source is not x
    out = source if in_place else torch.empty_like(source)
    if out.numel() == 0:
        return out
    block_h, block_w = tile or ((256, 256) if triton_interpreting() else (16, 64))
    grid = (batch * channels, triton.cdiv(height, block_h), triton.cdiv(width, block_w))
    params = to_device(torch.from_numpy(params), x.device)
    middle = torch.empty_like(source)
    # The largest kernel size is a runtime argument: as a constexpr every new size in a batch
    # would compile two more kernel variants (visual sizes 3..13) in the middle of training.
    shape = (channels, height, width, source.stride(0), source.stride(1), kmax)
    tiles = dict(BLOCK_H=block_h, BLOCK_W=block_w)
    # Vertical pass into a scratch batch (inactive planes left unwritten), then horizontal.
    _launch(
        _blur_kernel,
        grid,
        x,
        source,
        middle,
        source,
        params,
        *shape,
        VERTICAL=True,
        COPY_INACTIVE=False,
        **tiles,
    )
    _launch(
        _blur_kernel,
        grid,
        x,
        middle,
        out,
        source,
        params,
        *shape,
        VERTICAL=False,
        COPY_INACTIVE=not in_place,
        **tiles,
    )
    return out


if triton is not None:

    @triton.jit
    def _masked_rolled(plane, rows, cols, bins, frames, shift, t0, t1, f0, f1, inside):
        """The filterbank image after SpecAugment's masks and then the time roll, at integer
        positions (rows (H, 1), cols (1, W)): rolled[r] = masked[(r - shift) mod frames]."""
        source = (rows - shift) % frames
        source = tl.where(source < 0, source + frames, source)  # C remainder -> modulo
        hit = ((source >= t0) & (source < t1)) | ((cols >= f0) & (cols < f1))
        value = tl.load(plane + source * bins + cols, mask=inside, other=0.0)
        return tl.where(hit, 0.0, value)

    @triton.jit
    def _geometry_kernel(
        x_ptr,
        out_ptr,
        params_ptr,
        frames,
        bins,
        PARAMS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """One (BLOCK_H, BLOCK_W) tile of one sample's masked, rolled, cropped and resized
        (frames, bins) filterbank image."""
        row = tl.program_id(0)
        params = params_ptr + row * PARAMS
        t0 = tl.load(params + 1).to(tl.int32)
        t1 = tl.load(params + 2).to(tl.int32)
        f0 = tl.load(params + 3).to(tl.int32)
        f1 = tl.load(params + 4).to(tl.int32)
        shift = tl.load(params + 5).to(tl.int32)
        top = tl.load(params + 6).to(tl.int32)
        left = tl.load(params + 7).to(tl.int32)
        height = tl.load(params + 8).to(tl.int32)
        width = tl.load(params + 9).to(tl.int32)
        plane = x_ptr + row.to(tl.int64) * frames * bins
        ty = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        tx = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        inside = (ty < frames)[:, None] & (tx < bins)[None, :]
        # torch's bilinear resize (align_corners=False): source = scale * (i + 0.5) - 0.5,
        # clamped at 0, scale = crop / output. The crop is never larger than the output, and
        # for upsampling torchvision's antialiased filter has the same two taps.
        scale_y = tl.div_rn(height.to(tl.float32), frames.to(tl.float32))
        scale_x = tl.div_rn(width.to(tl.float32), bins.to(tl.float32))
        sy = tl.maximum(scale_y * (ty.to(tl.float32) + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_x * (tx.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = sy.to(tl.int32)  # sy >= 0: truncation is floor
        x0 = sx.to(tl.int32)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        hy = 1.0 - ly
        hx = 1.0 - lx
        r0 = (top + y0)[:, None]
        r1 = (top + tl.minimum(y0 + 1, height - 1))[:, None]
        c0 = (left + x0)[None, :]
        c1 = (left + tl.minimum(x0 + 1, width - 1))[None, :]
        mask = (bins, frames, shift, t0, t1, f0, f1, inside)
        v00 = _masked_rolled(plane, r0, c0, *mask)
        v01 = _masked_rolled(plane, r0, c1, *mask)
        v10 = _masked_rolled(plane, r1, c0, *mask)
        v11 = _masked_rolled(plane, r1, c1, *mask)
        hx2, lx2 = hx[None, :], lx[None, :]
        value = hy[:, None] * (hx2 * v00 + lx2 * v01) + ly[:, None] * (hx2 * v10 + lx2 * v11)
        out = out_ptr + row.to(tl.int64) * frames * bins + ty[:, None] * bins + tx[None, :]
        tl.store(out, value, mask=inside)


def fbank_geometry_triton(
    x: torch.Tensor, params: torch.Tensor, *, tile: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B, 1, T, F) filterbank images -> a new (B, 1, T, F): per sample SpecAugment's time and
    frequency masks, then the time roll, then the crop resized back to (T, F).

    params (B, 10) host: [masks on, time start, end, frequency start, end, shift, crop top,
    left, height, width], with empty masks and a zero shift where the masks are off, checked by
    ``kernels.augment.fbank_geometry`` (call that, not this). ``tile``: (rows, columns) per
    program (default (32, 64) on a GPU, (256, 128) under the interpreter).
    """
    params = params.to(torch.float32)
    return _fbank_tiles(
        _geometry_kernel, "fbank_geometry_triton", x, params, tile, PARAMS=params.shape[1]
    )


def _fbank_tiles(kernel, name: str, x: torch.Tensor, params: torch.Tensor, tile, **meta):
    """``kernel`` over (image, row tile, column tile) programs of (B, 1, T, F) images x, into
    a new tensor: its arguments (x, out, params, T, F) and tile sizes, then ``meta``. params
    (B, P) host, in the kernel's dtype; ``tile`` (rows, columns) or None for the default."""
    _require_backend(name, x)
    batch, _, frames, bins = x.shape
    source = x.contiguous()
    out = torch.empty_like(source)
    if out.numel() == 0:
        return out
    block_h, block_w = tile or ((256, 128) if triton_interpreting() else (32, 64))
    grid = (batch, triton.cdiv(frames, block_h), triton.cdiv(bins, block_w))
    params = to_device(params.contiguous(), x.device)
    _launch(
        kernel, grid, x, source, out, params, frames, bins, BLOCK_H=block_h, BLOCK_W=block_w, **meta
    )
    return out


if triton is not None:

    @triton.jit
    def _roll_mask_kernel(
        x_ptr,
        out_ptr,
        params_ptr,
        frames,
        bins,
        fill,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """One program per (image, tile): out[t, f] = fill inside the sample's time or frequency
        band, else x[(t - shift) mod T, f] (torch.roll's map, shift already in [0, T))."""
        row = tl.program_id(0)
        params = params_ptr + row * 5
        shift = tl.load(params)
        t0 = tl.load(params + 1)
        t1 = tl.load(params + 2)
        f0 = tl.load(params + 3)
        f1 = tl.load(params + 4)
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        inside = (rows < frames)[:, None] & (cols < bins)[None, :]
        source = rows - shift
        source = tl.where(source < 0, source + frames, source)
        base = row.to(tl.int64) * frames * bins
        value = tl.load(x_ptr + base + source[:, None] * bins + cols[None, :], mask=inside)
        band = ((rows >= t0) & (rows < t1))[:, None] | ((cols >= f0) & (cols < f1))[None, :]
        value = tl.where(band, fill, value)
        tl.store(out_ptr + base + rows[:, None] * bins + cols[None, :], value, mask=inside)


def roll_mask_triton(
    x: torch.Tensor,
    params: torch.Tensor,
    *,
    fill: float = 0.0,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, 1, T, F) filterbank images -> a new (B, 1, T, F): the time roll, then the time and
    frequency masks, set to ``fill``. params (B, 5) int32 host: [shift in [0, T), time start,
    end, frequency start, end], checked by ``kernels.augment.roll_and_mask`` (call that, not
    this). ``tile``: (rows, columns) per program (default (32, 64) on a GPU, (256, 128) under
    the interpreter).
    """
    params = params.to(torch.int32)
    return _fbank_tiles(_roll_mask_kernel, "roll_mask_triton", x, params, tile, fill=float(fill))


if triton is not None:

    @triton.jit
    def _finish_kernel(
        x_ptr,
        out_ptr,
        params_ptr,
        height,
        width,
        m0,
        m1,
        m2,
        s0,
        s1,
        s2,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """One (BLOCK_H, BLOCK_W) tile of one (3, H, W) image: flip, grayscale, normalise."""
        row = tl.program_id(0)
        flip = tl.load(params_ptr + 2 * row) > 0.5
        gray = tl.load(params_ptr + 2 * row + 1) > 0.5
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        inside = (rows < height)[:, None] & (cols < width)[None, :]
        source_cols = tl.where(flip, width - 1 - cols, cols)
        plane = height * width
        image = row.to(tl.int64) * 3 * plane
        source = x_ptr + image + rows[:, None] * width + source_cols[None, :]
        r = tl.load(source, mask=inside, other=0.0)
        g = tl.load(source + plane, mask=inside, other=0.0)
        b = tl.load(source + 2 * plane, mask=inside, other=0.0)
        if gray:
            r = _gray(r, g, b)
            g = r
            b = r
        target = out_ptr + image + rows[:, None] * width + cols[None, :]
        tl.store(target, tl.div_rn(r - m0, s0), mask=inside)
        tl.store(target + plane, tl.div_rn(g - m1, s1), mask=inside)
        tl.store(target + 2 * plane, tl.div_rn(b - m2, s2), mask=inside)


def finish_visual_triton(
    x: torch.Tensor,
    flip: np.ndarray,
    gray: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A new (B, 3, H, W) batch: per sample a horizontal flip and grayscale where ``flip`` /
    ``gray`` (B,) are set, then (x - mean[c]) / std[c]. Checked by
    ``kernels.augment.finish_visual`` (call that, not this). ``tile``: (rows, columns) per
    program (default (16, 64) on a GPU, (256, 256) under the interpreter)."""
    _require_backend("finish_visual_triton", x)
    batch, _, height, width = x.shape
    source = x.contiguous()
    out = torch.empty_like(source)  # a flip reads other columns: never in place
    if out.numel() == 0:
        return out
    params = torch.from_numpy(np.stack([flip, gray], axis=1).astype(np.float32))
    block_h, block_w = tile or ((256, 256) if triton_interpreting() else (16, 64))
    grid = (batch, triton.cdiv(height, block_h), triton.cdiv(width, block_w))
    _launch(
        _finish_kernel,
        grid,
        x,
        source,
        out,
        to_device(params, x.device),
        height,
        width,
        *(float(np.float32(m)) for m in mean),
        *(float(np.float32(s)) for s in std),
        BLOCK_H=block_h,
        BLOCK_W=block_w,
    )
    return out


if triton is not None:

    @triton.jit
    def _flip_transpose_kernel(
        x_ptr,
        out_ptr,
        params_ptr,
        frames,
        bins,
        CHANNELS: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One (BLOCK_F, BLOCK_T) tile of out[row] (3, F, T) from x[i] (CHANNELS, T, F)."""
        i = tl.program_id(0)
        row = tl.load(params_ptr + 2 * i).to(tl.int64)
        flip = tl.load(params_ptr + 2 * i + 1) > 0.5
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = (f < bins)[:, None] & (t < frames)[None, :]
        source_f = tl.where(flip, bins - 1 - f, f)
        plane = frames * bins
        source = x_ptr + i.to(tl.int64) * CHANNELS * plane + t[None, :] * bins + source_f[:, None]
        target = out_ptr + row * 3 * plane + f[:, None] * frames + t[None, :]
        for c in tl.static_range(3):
            channel = c if CHANNELS == 3 else 0
            value = tl.load(source + channel * plane, mask=inside, other=0.0)
            tl.store(target + c * plane, value, mask=inside)


def flip_transpose_triton(
    out: torch.Tensor,
    rows: np.ndarray,
    x: torch.Tensor,
    flip: np.ndarray,
    *,
    tile: tuple[int, int] | None = None,
) -> None:
    """out[rows[i]] = x[i] flipped along F where flip[i], transposed to (F, T) and broadcast
    over out's three channels: out (B, 3, F, T) contiguous, x (n, 1 or 3, T, F). Checked by
    ``kernels.augment.flip_transpose_into`` (call that, not this). ``tile``: (F, T) per program
    (default (32, 64) on a GPU, (128, 256) under the interpreter)."""
    _require_backend("flip_transpose_triton", x)
    n, channels, frames, bins = x.shape
    if n == 0 or x.numel() == 0:
        return
    source = x.contiguous()
    params = torch.from_numpy(np.stack([rows, flip], axis=1).astype(np.float32))
    block_f, block_t = tile or ((128, 256) if triton_interpreting() else (32, 64))
    grid = (n, triton.cdiv(bins, block_f), triton.cdiv(frames, block_t))
    _launch(
        _flip_transpose_kernel,
        grid,
        x,
        source,
        out,
        to_device(params, x.device),
        frames,
        bins,
        CHANNELS=channels,
        BLOCK_F=block_f,
        BLOCK_T=block_t,
    )
