"""``kernels.augment`` equals torchvision's functional transforms, torch.roll and slicing.

Two kinds of image: a normalised Kaldi fbank of real test signals as the (3, 1024, 128) image the
audio view is made from (equal channels, values mostly outside [0, 1], so the colour ops clip), and
(3, 240, 320) / (3, 224, 224) RGB frames in [0, 1] quantised to /255 (ties between channels, grey
and saturated patches). Tolerances against torchvision (max abs): 1e-6 for brightness, contrast,
saturation, grayscale, normalize (observed: 0, contrast 1 ulp from the batched mean); 1e-5 for hue
and jitter (observed: hue 0, jitter 2e-6); 1e-5 for resized_crop (observed 0: the same interpolate
call); 5e-6 for blur (separable passes vs torchvision's 2-D kernel: ~10 ulp of the fbank's values
up to 2.7, observed 2.4e-6 with 13 taps); flips, masks and rolls exact.
Inactive samples must come back bit for bit, and each op has one negative check: a wrong parameter
(swapped, transposed, rolled between samples) must fail the same comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from kernels import augment as K
from kernels.fbank import fbank_torch
from tests.signals import make_signal

FBANK_MEAN, FBANK_STD = -4.346, 4.332  # AudioSet normalisation (spec)
FRAMES_SAMPLES = 400 + 1023 * 160  # a waveform that gives exactly 1024 frames
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("fbank", "rgb240x320", "rgb224")
OPS = {
    "brightness": (K.adjust_brightness, TF.adjust_brightness),
    "contrast": (K.adjust_contrast, TF.adjust_contrast),
    "saturation": (K.adjust_saturation, TF.adjust_saturation),
    "hue": (K.adjust_hue, TF.adjust_hue),
}
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
TOL = {"brightness": 1e-6, "contrast": 1e-6, "saturation": 1e-6, "hue": 1e-5}


def _fbank_images() -> torch.Tensor:
    """(3, 3, 1024, 128): normalised fbanks of quiet music, loud music and quiet pink noise."""
    waves = []
    for kind, seed, gain in (("music", 0, 0.05), ("music", 1, 1.0), ("pink", 2, 0.02)):
        wave = torch.from_numpy(make_signal(kind, FRAMES_SAMPLES / 16000, seed=seed)) * gain
        waves.append(wave)
    feats = fbank_torch(torch.stack(waves)).feats
    assert feats.shape == (3, 1024, 128)
    image = (feats - FBANK_MEAN) / FBANK_STD
    return image[:, None].expand(3, 3, 1024, 128).contiguous()


def _rgb_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(batch, 3, H, W) in [0, 1] on the /255 grid: smooth colour fields plus noise, with a grey
    patch (equal channels) and a saturated patch (pure red, green, blue, black, white)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")
    x = x + 0.05 * torch.randn(batch, 3, height, width, generator=g)
    x[:, :, :24, :24] = x[:, :1, :24, :24]
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1.0]])
    for i, c in enumerate(colours):
        x[:, :, 24:40, 8 * i : 8 * i + 8] = c.view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    return {
        "fbank": _fbank_images(),
        "rgb240x320": _rgb_images(5, 240, 320, seed=1),
        "rgb224": _rgb_images(5, 224, 224, seed=2),
    }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _active(batch: int) -> torch.Tensor:
    """All samples active except the second."""
    active = torch.ones(batch, dtype=torch.bool)
    active[1] = False
    return active


def _check(out: torch.Tensor, x: torch.Tensor, active: torch.Tensor, ref, tol: float) -> float:
    """Active samples within ``tol`` of ``ref(b)``, inactive ones bit for bit; returns max error."""
    assert out.shape[:2] == x.shape[:2] and out.dtype == torch.float32
    worst = 0.0
    for b in range(x.shape[0]):
        if active[b]:
            worst = max(worst, (out[b] - ref(b)).abs().max().item())
        else:
            assert torch.equal(out[b], x[b]), f"inactive sample {b} changed"
    assert worst <= tol, f"max error {worst} > {tol}"
    return worst


def _max_error(out: torch.Tensor, ref, samples) -> float:
    return max((out[b] - ref(b)).abs().max().item() for b in samples)


def test_fbank_image_is_mostly_outside_unit_range(images):
    x = images["fbank"]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert (x < 0).float().mean() > 0.5 and (x > 1).any()


# ------------------------------------------------------------------------------------------------
# resized_crop
# ------------------------------------------------------------------------------------------------


def _crops(kind: str, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop.get_params per sample with the spec's scale and ratio ranges."""
    ratio = (1 / 10, 1.5 / 8) if kind == "fbank" else (3 / 4, 4 / 3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        boxes = [RandomResizedCrop.get_params(x[b], (0.08, 1.0), ratio) for b in range(len(x))]
    return tuple(torch.tensor(column) for column in zip(*boxes, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_resized_crop_matches_torchvision(images, kind):
    x = images[kind]
    size = (1024, 128) if kind == "fbank" else (224, 224)
    top, left, height, width = _crops(kind, x, seed=3)
    # One full-image crop: for the fbank it is already out_size (torchvision's same-size path).
    top[0], left[0], height[0], width[0] = 0, 0, x.shape[2], x.shape[3]
    for antialias in (True, False):
        out = K.resized_crop(x, top, left, height, width, size, antialias=antialias)
        assert out.shape == (x.shape[0], 3, *size)

        def ref(b, antialias=antialias):
            box = (int(top[b]), int(left[b]), int(height[b]), int(width[b]))
            return TF.resized_crop(x[b], *box, list(size), antialias=antialias)

        _check(out, x, torch.ones(len(x), dtype=torch.bool), ref, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_resized_crop_swapped_top_left_fails(images, kind):
    x = images[kind]
    n = len(x)
    top, left, height, width = (torch.full((n,), v) for v in (10, 40, 100, 60))
    size = (1024, 128) if kind == "fbank" else (224, 224)

    def ref(b):
        return TF.resized_crop(x[b], 10, 40, 100, 60, list(size))

    assert _max_error(K.resized_crop(x, top, left, height, width, size), ref, range(n)) == 0
    assert _max_error(K.resized_crop(x, left, top, height, width, size), ref, range(n)) > 0.05


def test_resized_crop_rejects_crops_outside_the_image(images):
    x = images["rgb224"]
    ones = torch.ones(len(x), dtype=torch.long)
    with pytest.raises(ValueError, match="sample 0 crop"):
        K.resized_crop(x, ones * 200, ones, ones * 30, ones * 30, (224, 224))
    with pytest.raises(ValueError, match="shape"):
        K.resized_crop(x, ones[:2], ones, ones, ones, (224, 224))


# ------------------------------------------------------------------------------------------------
# Colour
# ------------------------------------------------------------------------------------------------


def _factors(op: str, batch: int, seed: int) -> torch.Tensor:
    """Spec ranges: b, c, s uniform in [0.6, 1.4] (the first sample 2.0, the last 0.0), h in
    [-0.1, 0.1] (the first 0.5, the last -0.5): torchvision's extremes too."""
    g = _gen(seed)
    if op == "hue":
        f = torch.rand(batch, generator=g) * 0.2 - 0.1
        f[0], f[-1] = 0.5, -0.5
    else:
        f = torch.rand(batch, generator=g) * 0.8 + 0.6
        f[0], f[-1] = 2.0, 0.0
    return f


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("kind", KINDS)
def test_colour_op_matches_torchvision(selection, images, kind, op):
    x = images[kind]
    ours, theirs = OPS[op]
    factor = _factors(op, len(x), seed=4)
    active = _active(len(x))
    out = ours(x, factor, active)
    # factor[b].item() is the float32 number as a Python float: what torchvision applies.
    _check(out, x, active, lambda b: theirs(x[b], factor[b].item()), TOL[op])


@pytest.mark.parametrize("op", list(OPS))
def test_colour_op_with_another_samples_factor_fails(images, op):
    x = images["rgb240x320"]
    ours, theirs = OPS[op]
    factor = _factors(op, len(x), seed=5)
    wrong = factor.roll(1)
    error = _max_error(ours(x, wrong), lambda b: theirs(x[b], factor[b].item()), range(len(x)))
    assert error > 0.05


@pytest.mark.parametrize("op", ["brightness", "contrast"])
def test_fbank_colour_op_with_another_samples_factor_fails(images, op):
    x = images["fbank"]
    ours, theirs = OPS[op]
    factor = torch.tensor([0.6, 1.0, 1.4])
    error = _max_error(ours(x, factor.roll(1)), lambda b: theirs(x[b], factor[b].item()), range(3))
    assert error > 0.05


def test_hue_on_the_raw_fbank_clips_two_channels(images):
    """A torchvision quirk the spec's "hue does nothing to equal channels" misses: outside
    [0, 1] its HSV -> RGB clamps p, q, t but not v, so hue applied before any clamping op keeps
    the raw values in the red channel and clips green and blue (for any small hue factor)."""
    image = images["fbank"][0]
    factors = torch.tensor([0.1, -0.1])
    out = K.adjust_hue(torch.stack([image, image]), factors)
    assert torch.equal(out[:, 0], image[0].expand(2, -1, -1))
    assert torch.equal(out[:, 1:], image[1:].clamp(0, 1).expand(2, -1, -1, -1))
    assert torch.equal(out[1], TF.adjust_hue(image, -0.1))


def _jitter_reference(x: torch.Tensor, order, factors):
    """torchvision's adjust_* one after another in the sample's order."""
    y = x
    for op in order.tolist():
        y = TV_JITTER[op](y, factors[op].item())
    return y


def _jitter_params(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(batch)])
    factors = torch.rand(batch, 4, generator=g) * 0.8 + 0.6
    factors[:, 3] = torch.rand(batch, generator=g) * 0.2 - 0.1
    return order, factors


@pytest.mark.parametrize("kind", KINDS)
def test_color_jitter_matches_sequential_torchvision(selection, images, kind):
    x = images[kind]
    order, factors = _jitter_params(len(x), seed=6)
    active = _active(len(x))
    out = K.color_jitter(x, order, factors, active)
    _check(out, x, active, lambda b: _jitter_reference(x[b], order[b], factors[b]), 1e-5)


@pytest.mark.parametrize("kind", ["fbank", "rgb240x320"])
def test_color_jitter_order_matters(images, kind):
    image = images[kind][0]
    x = torch.stack([image, image])
    factors = torch.tensor([[1.3, 0.7, 1.4, 0.08]] * 2)
    # fbank: contrast before brightness vs after (the clamp between them differs); hue first on
    # the raw fbank keeps one channel unclamped.
    order = torch.tensor([[0, 1, 2, 3], [3, 1, 2, 0]])
    out = K.color_jitter(x, order, factors)
    refs = [_jitter_reference(image, order[b], factors[b]) for b in range(2)]
    assert (refs[0] - refs[1]).abs().max() > 0.05
    for b in range(2):
        assert (out[b] - refs[b]).abs().max() <= 1e-5
        assert (out[b] - refs[1 - b]).abs().max() > 0.05


def test_color_jitter_checks_its_parameters(images):
    x = images["rgb224"]
    order, factors = _jitter_params(len(x), seed=7)
    bad = order.clone()
    bad[0] = torch.tensor([0, 0, 1, 2])
    with pytest.raises(ValueError, match="permutation"):
        K.color_jitter(x, bad, factors)
    inactive = torch.zeros(len(x), dtype=torch.bool)
    assert torch.equal(K.color_jitter(x, bad, factors, inactive), x)  # off rows are not checked
    wrong_hue = factors.clone()
    wrong_hue[2, 3] = 0.6
    with pytest.raises(ValueError, match="hue"):
        K.color_jitter(x, order, wrong_hue)
    with pytest.raises(ValueError, match="brightness"):
        K.adjust_brightness(x, torch.full((len(x),), -0.1))


# ------------------------------------------------------------------------------------------------
# Gaussian blur
# ------------------------------------------------------------------------------------------------


def _blur_reference(x, sigma, sizes):
    return lambda b: TF.gaussian_blur(x[b], [int(sizes[b])] * 2, [sigma[b].item()] * 2)


@pytest.mark.parametrize("kind", KINDS)
def test_gaussian_blur_matches_torchvision(selection, images, kind):
    x = images[kind]
    if kind == "fbank":
        sigma = torch.tensor([0.3, 1.5, 2.0])
        sizes = K.audio_blur_kernel_size(sigma)
        assert sizes.tolist() == [3, 5, 5]
        active = torch.ones(3, dtype=torch.bool)
    else:
        sigma = torch.tensor([0.1, 0.4, 0.5, 1.2, 2.0])
        sizes = K.visual_blur_kernel_size(sigma)
        assert sizes.tolist() == [3, 5, 5, 9, 13]
        active = _active(len(x))
    out = K.gaussian_blur(x, sigma, sizes, active)
    _check(out, x, active, _blur_reference(x, sigma, sizes), 5e-6)


def test_gaussian_blur_with_wrong_sigma_or_kernel_size_fails(selection, images):
    x = images["rgb240x320"]
    sigma = torch.tensor([0.3, 0.7, 1.1, 1.6, 2.0])
    sizes = K.visual_blur_kernel_size(sigma)
    ref = _blur_reference(x, sigma, sizes)
    assert _max_error(K.gaussian_blur(x, sigma, sizes), ref, range(5)) <= 5e-6
    assert _max_error(K.gaussian_blur(x, sigma.roll(1), sizes), ref, range(5)) > 0.01
    audio_sizes = K.audio_blur_kernel_size(sigma)
    assert _max_error(K.gaussian_blur(x, sigma, audio_sizes), ref, range(5)) > 0.01


def test_blur_kernel_size_rules():
    sigma = torch.tensor([0.1, 1.0, 1.0001, 1 / 3, 0.5, 2.0])
    audio = [2 * math.ceil(s) + 1 for s in sigma.tolist()]
    visual = [2 * math.ceil(3 * s) + 1 for s in sigma.tolist()]
    assert audio == [3, 3, 5, 3, 3, 5]
    # float32(1/3) is a little above 1/3: Python's ceil gives 2 (float32 arithmetic would give 1).
    assert visual == [3, 7, 9, 5, 5, 13]
    assert K.audio_blur_kernel_size(sigma).tolist() == audio
    assert K.visual_blur_kernel_size(sigma).tolist() == visual
    assert K.visual_blur_kernel_size(0.5) == 5 and K.audio_blur_kernel_size(1.5) == 5


def test_gaussian_blur_checks_active_parameters_only(selection, images):
    x = images["rgb224"]
    sigma = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])  # blur off: the t-vector holds sigma 0
    active = torch.tensor([False, True, True, True, True])
    sizes = K.visual_blur_kernel_size(sigma)
    out = K.gaussian_blur(x, sigma, sizes, active)
    assert torch.equal(out[0], x[0])
    with pytest.raises(ValueError, match="sigma"):
        K.gaussian_blur(x, sigma, sizes)
    with pytest.raises(ValueError, match="odd"):
        K.gaussian_blur(x, sigma, sizes + 1, active)


# ------------------------------------------------------------------------------------------------
# Flip, grayscale, normalize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_hflip_matches_torchvision(selection, images, kind):
    x = images[kind]
    active = _active(len(x))
    out = K.hflip(x, active)
    _check(out, x, active, lambda b: TF.hflip(x[b]), 0.0)
    assert _max_error(out, lambda b: TF.vflip(x[b]), [0]) > 0.05  # the transposed axis


@pytest.mark.parametrize("kind", ["rgb240x320", "rgb224"])
def test_grayscale_matches_torchvision(selection, images, kind):
    x = images[kind]
    active = _active(len(x))
    out = K.grayscale(x, active)
    _check(out, x, active, lambda b: TF.rgb_to_grayscale(x[b], num_output_channels=3), 1e-6)
    # Equal-weight grey (a wrong set of weights) is not what torchvision does.
    assert _max_error(out, lambda b: x[b].mean(0, keepdim=True).expand(3, -1, -1), [0]) > 0.02


@pytest.mark.parametrize("kind", KINDS)
def test_normalize_matches_torchvision(images, kind):
    x = images[kind]
    out = K.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    ref = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert (out - ref).abs().max() <= 1e-6
    swapped = K.normalize(x, IMAGENET_STD, IMAGENET_MEAN)
    assert (swapped - ref).abs().max() > 0.1
    with pytest.raises(ValueError, match="non-zero"):
        K.normalize(x, IMAGENET_MEAN, (1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# Masks and rolls on the fbank image
# ------------------------------------------------------------------------------------------------


def _spec_mask(batch: int, length: int, max_width: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The spec's SpecAugment draw: width v = U * max_width, start = floor(U * (L - v))."""
    g = _gen(seed)
    width = torch.rand(batch, generator=g, dtype=torch.float64) * max_width
    start = torch.floor(torch.rand(batch, generator=g, dtype=torch.float64) * (length - width))
    return start.long(), (start + torch.floor(width)).long()


@pytest.mark.parametrize("axis,max_width", [(2, 192), (3, 48)])
def test_mask_rows_matches_slicing(selection, images, axis, max_width):
    x = images["fbank"]
    length = x.shape[axis]
    start, end = _spec_mask(3, length, max_width, seed=8)
    start[2], end[2] = 0, length  # the whole axis
    active = _active(3)

    def ref(b):
        y = x[b].clone()
        y.narrow(axis - 1, int(start[b]), int(end[b] - start[b])).zero_()
        return y

    out = K.mask_rows(x, start, end, axis, active)
    _check(out, x, active, ref, 0.0)
    empty = K.mask_rows(x, start, start, axis)  # start == end: nothing masked
    assert torch.equal(empty, x)
    # The same numbers on the other axis (transposed) are not the same mask.
    small_start, small_end = start.clamp(max=100), end.clamp(max=120)
    other = K.mask_rows(x, small_start, small_end, 5 - axis)
    assert not torch.equal(other, K.mask_rows(x, small_start, small_end, axis))
    with pytest.raises(ValueError, match="start <= end"):
        K.mask_rows(x, end, start + (start == end), axis)


@pytest.mark.parametrize("axis", [2, 3])
@pytest.mark.parametrize("kind", ["fbank", "rgb240x320"])
def test_roll_matches_torch_roll(selection, images, kind, axis):
    x = images[kind]
    shifts = torch.tensor([-1024, 5, 1023, -7, 2000])[: len(x)]
    active = _active(len(x))
    out = K.roll(x, shifts, axis, active)
    _check(out, x, active, lambda b: torch.roll(x[b], int(shifts[b]), axis - 1), 0.0)
    wrong = K.roll(x, -shifts, axis, active)  # the opposite direction
    assert _max_error(wrong, lambda b: torch.roll(x[b], int(shifts[b]), axis - 1), [2]) > 0.05
    with pytest.raises(ValueError, match="axis"):
        K.roll(x, shifts, 1)


# ------------------------------------------------------------------------------------------------
# dtype, autocast, CUDA
# ------------------------------------------------------------------------------------------------


def test_only_float32_batches(images):
    x = images["rgb224"]
    with pytest.raises(TypeError, match="float32"):
        K.hflip(x.double())
    with pytest.raises(TypeError, match=r"\(B, C, H, W\)"):
        K.hflip(x[0])


def _all_ops(x: torch.Tensor, kind: str, device: str) -> dict[str, torch.Tensor]:
    """Every op on x with fixed parameters, the parameters on ``device``."""
    n = len(x)
    d = {"device": device}
    active = _active(n).to(device)
    top, left, height, width = (p.to(device) for p in _crops(kind, x.cpu(), seed=9))
    size = (1024, 128) if kind == "fbank" else (224, 224)
    order, factors = _jitter_params(n, seed=10)
    sigma = torch.linspace(0.1, 2.0, n, **d)
    rule = K.audio_blur_kernel_size if kind == "fbank" else K.visual_blur_kernel_size
    start, end = _spec_mask(n, x.shape[2], 192, seed=11)
    out = {
        "resized_crop": K.resized_crop(x, top, left, height, width, size),
        "color_jitter": K.color_jitter(x, order.to(device), factors.to(device), active),
        "gaussian_blur": K.gaussian_blur(x, sigma, rule(sigma), active),
        "hflip": K.hflip(x, active),
        "grayscale": K.grayscale(x, active),
        "normalize": K.normalize(x, IMAGENET_MEAN, IMAGENET_STD),
        "mask_rows": K.mask_rows(x, start.to(device), end.to(device), 2, active),
        "roll": K.roll(x, torch.arange(n, **d) * 37 - 50, 3, active),
    }
    for op, (ours, _) in OPS.items():
        out[op] = ours(x, _factors(op, n, seed=12).to(device), active)
    return out


def test_autocast_does_not_change_the_ops(images):
    x = images["rgb240x320"]
    plain = _all_ops(x, "rgb240x320", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _all_ops(x, "rgb240x320", "cpu")
    for name in plain:
        assert cast[name].dtype == torch.float32, name
        assert torch.equal(cast[name], plain[name]), name


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(images, kind):
    x = images[kind]
    cpu = _all_ops(x, kind, "cpu")
    gpu = _all_ops(x.cuda(), kind, "cuda")
    for name in cpu:
        assert gpu[name].is_cuda, name
        error = (gpu[name].cpu() - cpu[name]).abs().max().item()
        assert error <= 1e-5, f"{name}: CUDA differs from CPU by {error}"


def test_hue_fast_path_for_grey_images_is_exact_in_every_sector():
    """Equal-channel images take a closed form; it must equal torchvision for any hue factor,
    alone and in a batch mixed with colour images (which take the general path)."""
    gen = torch.Generator().manual_seed(5)
    grey = (torch.randn(1, 64, 48, generator=gen) * 1.5).expand(3, -1, -1)
    colour = torch.rand(3, 64, 48, generator=gen)
    factors = [-0.5, -0.41, -0.3, -0.17, -0.05, 0.0, 0.05, 0.17, 0.3, 0.41, 0.5]
    for f in factors:
        got = K.adjust_hue(torch.stack([grey, colour]), [f, f])
        assert torch.equal(got[0], TF.adjust_hue(grey, f)), f
        assert (got[1] - TF.adjust_hue(colour, f)).abs().max() < 1e-5, f
        alone = K.adjust_hue(grey.unsqueeze(0).contiguous(), [f])
        assert torch.equal(alone[0], TF.adjust_hue(grey, f)), f
        # On a GPU every image takes the general path (no host check): the same numbers.
        general = K._hue_general(grey.unsqueeze(0).contiguous(), torch.tensor([f]))
        assert torch.equal(general[0], TF.adjust_hue(grey, f)), f


def test_grey_image_stored_once_equals_three_equal_channels(selection):
    """color_jitter and gaussian_blur on a one-channel grey image (the filterbank image) equal the
    three-channel computation bit for bit, for every order without hue first, on values outside
    [0, 1] as a normalised filterbank has; hue first is refused on one channel."""
    gen = torch.Generator().manual_seed(11)
    n = 48
    x1 = torch.randn(n, 1, 40, 24, generator=gen) * 2.0
    x3 = x1.expand(-1, 3, -1, -1).contiguous()
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    hue_first = order[:, 0] == 3
    order[hue_first] = order[hue_first][:, [1, 0, 2, 3]]  # hue second instead
    factors = torch.rand(n, 4, generator=gen) * 0.8 + 0.6
    factors[:, 3] = torch.rand(n, generator=gen) * 0.2 - 0.1
    active = torch.rand(n, generator=gen) < 0.8
    one = K.color_jitter(x1, order, factors, active)
    three = K.color_jitter(x3, order, factors, active)
    assert one.shape == (n, 1, 40, 24)
    assert torch.equal(one.expand(-1, 3, -1, -1), three)
    assert not torch.equal(one[active], x1[active])  # the jitter did something
    sigma = torch.rand(n, generator=gen) * 2.0 + 0.1
    sizes = K.audio_blur_kernel_size(sigma)
    assert torch.equal(
        K.gaussian_blur(one, sigma, sizes, active).expand(-1, 3, -1, -1),
        K.gaussian_blur(three, sigma, sizes, active),
    )
    order[0] = torch.tensor([3, 0, 1, 2])
    active[0] = True
    with pytest.raises(ValueError, match="hue first"):
        K.color_jitter(x1, order, factors, active)
    # Why: hue first clamps green and blue only, and a later brightness < 1 keeps them apart.
    bright = torch.full((1, 3, 4, 4), 1.5)
    out = K.color_jitter(bright, order[:1], torch.tensor([[0.8, 1.0, 1.0, 0.0]]))
    assert out[0, 0, 0, 0] == 1.0 and out[0, 1, 0, 0] == out[0, 2, 0, 0] == 0.8


def test_owned_intermediates_give_the_same_values(selection, images):
    """``owned=True`` (the caller's own intermediate, which the kernel may overwrite) changes no
    value; without it the input is left untouched."""
    x = images["rgb224"]
    n = len(x)
    gen = _gen(12)
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    factors = torch.rand(n, 4, generator=gen) * 0.8 + 0.6
    factors[:, 3] = torch.rand(n, generator=gen) * 0.2 - 0.1
    sigma = torch.rand(n, generator=gen) * 1.9 + 0.1
    active = _active(n)
    calls = {
        "color_jitter": lambda y, **kw: K.color_jitter(y, order, factors, active, **kw),
        "gaussian_blur": lambda y, **kw: K.gaussian_blur(
            y, sigma, K.visual_blur_kernel_size(sigma), active, **kw
        ),
        "hflip": lambda y, **kw: K.hflip(y, active, **kw),
        "grayscale": lambda y, **kw: K.grayscale(y, active, **kw),
        "normalize": lambda y, **kw: K.normalize(y, IMAGENET_MEAN, IMAGENET_STD, **kw),
        "mask_rows": lambda y, **kw: K.mask_rows(
            y, torch.arange(n) * 7, torch.arange(n) * 7 + 30, 2, active, **kw
        ),
    }
    for name, call in calls.items():
        original = x.clone()
        fresh = call(x)
        assert torch.equal(x, original), f"{name} modified its input"
        assert torch.equal(call(x.clone(), owned=True), fresh), f"{name}: owned changed values"
