"""The fused Triton kernels (kernels.augment_triton: the GPU paths of kernels.augment's
color_jitter and gaussian_blur) against the torch paths and torchvision.

The kernels run on the CPU under TRITON_INTERPRET=1 in one subprocess (the variable must be set
before triton decorates them), are compiled for an H100 (sm_90) without a GPU to check that they
build and keep torch's rounding (no fused multiply-adds, IEEE division), and run on CUDA in the
tests marked `cuda`.

Colour jitter rounds every op as the torch path does (which equals torchvision bit for bit), so
with contrast's factor at 1 (its mean then drops out of the blend) it equals the torch path bit
for bit (on the CPU interpreter; on a GPU up to denormals, see kernels.augment_triton).
Otherwise the one difference is the order of contrast's mean sum (a few ulp of the mean), which
a later hue amplifies on near-grey pixels (1.4e-6 seen): 1e-5 against the torch path and
against torchvision, as for the torch path. Blur: 1e-6 against the torch path (the same taps
summed in another order), 5e-6 against torchvision (its one 2-D convolution), as for the torch
path. Inactive samples bit for bit everywhere.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from kernels import augment as K
from kernels import augment_triton as J
from tests.subprocess_env import interpreter_env
from tests.test_augment_kernels import (
    TV_JITTER,
    _blur_reference,
    _crops,
    _fbank_images,
    _jitter_params,
    _rgb_images,
    _spec_mask,
)

REPO = Path(__file__).resolve().parents[1]
TOL_TORCH = 1e-5
TOL_TORCHVISION = 1e-5
BLUR_TOL_TORCH = 1e-6
BLUR_TOL_TORCHVISION = 5e-6
GEOMETRY_TOL = 2e-6
needs_triton = pytest.mark.skipif(J.triton is None, reason="triton is not installed")


def jitter_cases() -> dict[str, tuple[torch.Tensor, ...]]:
    """name -> (x, order, factors, active): colour images with grey and saturated patches, the
    raw (three-channel, mostly outside [0, 1]) filterbank image, and a grey image stored once."""
    gen = torch.Generator().manual_seed(3)
    cases = {}
    for name, x in (
        ("rgb", _rgb_images(6, 60, 84, seed=4)),  # 5040 pixels: not a multiple of the block
        ("fbank", _fbank_images()[:, :, :256]),
    ):
        order, factors = _jitter_params(len(x), seed=len(name))
        order[0] = torch.tensor([1, 0, 2, 3])  # contrast first: the mean of the raw image
        order[-1] = torch.tensor([3, 2, 0, 1])  # contrast last: after the three other ops
        active = torch.ones(len(x), dtype=torch.bool)
        active[1] = False
        cases[name] = (x, order, factors, active)
    n = 12
    grey = torch.randn(n, 1, 40, 24, generator=gen) * 2.0
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    hue_first = order[:, 0] == 3
    order[hue_first] = order[hue_first][:, [1, 0, 2, 3]]  # hue first is refused on one channel
    factors = torch.rand(n, 4, generator=gen) * 0.8 + 0.6
    factors[:, 3] = torch.rand(n, generator=gen) * 0.2 - 0.1
    active = torch.rand(n, generator=gen) < 0.75
    cases["grey"] = (grey, order, factors, active)
    return cases


def run_jitter(cases: dict, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each case through ``color_jitter_triton`` on ``device``: the result, the result with
    ``owned`` (and whether it was written into x), and whether x stayed untouched otherwise."""
    results = {}
    for name, (x, order, factors, active) in cases.items():
        x = x.to(device)
        before = x.clone()
        args = (order.numpy(), factors.float().numpy(), active.numpy())
        # The colour case in tiles of 1024 pixels (5 per image, the last one partial), as on a
        # GPU; the others in the interpreter's default (the filterbank's: 4 tiles of 8192).
        block = 1024 if name == "rgb" else None
        out = J.color_jitter_triton(x, *args, block=block)
        mine = x.clone()
        owned = J.color_jitter_triton(mine, *args, owned=True, block=block)
        neutral = factors.float().clone()
        neutral[:, 1] = 1.0  # contrast's mean drops out: the rest must round as torch does
        contrast_1 = J.color_jitter_triton(x, args[0], neutral.numpy(), args[2], block=block)
        results[name] = {
            "out": out.cpu(),
            "contrast_1": contrast_1.cpu(),
            "owned": owned.cpu(),
            "owned_in_place": torch.tensor(owned.data_ptr() == mine.data_ptr()),
            "input_untouched": torch.tensor(torch.equal(x, before)),
        }
    return results


def check_jitter(cases: dict, results: dict) -> None:
    for name, (x, order, factors, active) in cases.items():
        got = results[name]
        torch_path = K.color_jitter(x, order, factors, active)
        assert bool(got["input_untouched"]), name
        assert bool(got["owned_in_place"]), name
        assert torch.equal(got["owned"], got["out"]), name
        neutral = factors.clone()
        neutral[:, 1] = 1.0
        exact = K.color_jitter(x, order, neutral, active)
        assert torch.equal(got["contrast_1"], exact), f"{name}: not bit for bit without the mean"
        out = got["out"]
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.equal(out[~active], x[~active]), f"{name}: inactive samples changed"
        error = (out - torch_path).abs().max().item()
        assert error <= TOL_TORCH, f"{name}: fused differs from the torch path by {error}"
        for b in active.nonzero().flatten().tolist():
            image = x[b].expand(3, -1, -1) if x.shape[1] == 1 else x[b]
            ref = image
            for op in order[b].tolist():
                ref = TV_JITTER[op](ref, factors[b, op].item())
            error = (out[b].expand(3, -1, -1) - ref).abs().max().item()
            assert error <= TOL_TORCHVISION, f"{name} sample {b}: {error} from torchvision"
            # Another sample's order (the same factors) gives another image: the check can fail.
            other = order[(b + 1) % len(order)]
            if not torch.equal(other, order[b]) and name == "rgb":
                wrong = image
                for op in other.tolist():
                    wrong = TV_JITTER[op](wrong, factors[b, op].item())
                assert (out[b] - wrong).abs().max().item() > 10 * TOL_TORCHVISION, f"{name} {b}"


def blur_cases() -> dict[str, tuple[torch.Tensor, ...]]:
    """name -> (x, sigma, kernel sizes, active): colour images (sizes 3..13; 60 x 84 is not a
    multiple of a tile), the filterbank image stored once (audio sizes) and with three channels."""
    rgb = _rgb_images(6, 60, 84, seed=5)
    sigma = torch.tensor([0.1, 0.4, 0.5, 1.2, 2.0, 1.7])
    sizes = K.visual_blur_kernel_size(sigma)
    assert sizes.tolist() == [3, 5, 5, 9, 13, 13]
    active = torch.ones(6, dtype=torch.bool)
    active[1] = False
    fbank = _fbank_images()[:, :, :256]
    audio_sigma = torch.tensor([0.3, 1.5, 2.0])
    audio_sizes = K.audio_blur_kernel_size(audio_sigma)
    on = torch.tensor([True, False, True])
    return {
        "rgb": (rgb, sigma, sizes, active),
        "fbank1": (fbank[:, :1].contiguous(), audio_sigma, audio_sizes, on),
        "fbank3": (fbank, audio_sigma, audio_sizes, on),
    }


def _blur_weights(sigma, sizes, active):
    return K.gaussian_kernels_host(sigma.numpy(), sizes.numpy(), active.numpy())


def test_host_blur_weights_match_the_torch_kernels() -> None:
    """The fused blur's numpy weights are the torch path's Gaussians (to an ulp), zero-padded
    around each sample's own size; inactive samples get a one-tap kernel."""
    sigma = torch.tensor([0.1, 0.4, 0.0, 1.2, 2.0])
    sizes = K.visual_blur_kernel_size(torch.where(sigma > 0, sigma, 1.0))
    active = torch.tensor([True, True, False, True, True])
    weights, own = _blur_weights(sigma, sizes, active)
    assert own.tolist() == [3, 5, 1, 9, 13] and weights.shape == (5, 13)
    for b in range(5):
        half = own[b] // 2
        taps = weights[b, 6 - half : 7 + half]
        assert (np.delete(weights[b], range(6 - half, 7 + half)) == 0).all()
        if active[b]:
            ref = K._gaussian_kernels(sigma[b : b + 1], int(own[b]))[0].numpy()
            np.testing.assert_allclose(taps, ref, rtol=2e-7, atol=1e-12)
        else:
            assert taps.tolist() == [1.0]


def run_blur(cases: dict, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each case through ``gaussian_blur_triton`` on ``device`` (see ``run_jitter``), and with
    the sigmas shifted by one sample (a wrong parameter, which the check must notice)."""
    results = {}
    for name, (x, sigma, sizes, active) in cases.items():
        x = x.to(device)
        before = x.clone()
        weights, own = _blur_weights(sigma, sizes, active)
        out = J.gaussian_blur_triton(x, weights, own, active.numpy())
        mine = x.clone()
        owned = J.gaussian_blur_triton(mine, weights, own, active.numpy(), owned=True)
        wrong, _ = _blur_weights(sigma.roll(1), sizes, active)
        results[name] = {
            "out": out.cpu(),
            "wrong_sigma": J.gaussian_blur_triton(x, wrong, own, active.numpy()).cpu(),
            "owned": owned.cpu(),
            "owned_in_place": torch.tensor(owned.data_ptr() == mine.data_ptr()),
            "input_untouched": torch.tensor(torch.equal(x, before)),
        }
    return results


def check_blur(cases: dict, results: dict) -> None:
    for name, (x, sigma, sizes, active) in cases.items():
        got = results[name]
        assert bool(got["input_untouched"]), name
        assert bool(got["owned_in_place"]), name
        assert torch.equal(got["owned"], got["out"]), name
        out = got["out"]
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.equal(out[~active], x[~active]), f"{name}: inactive samples changed"
        error = (out - K.gaussian_blur(x, sigma, sizes, active)).abs().max().item()
        assert error <= BLUR_TOL_TORCH, f"{name}: fused differs from the torch path by {error}"
        reference = _blur_reference(x, sigma, sizes)
        for b in active.nonzero().flatten().tolist():
            error = (out[b] - reference(b)).abs().max().item()
            assert error <= BLUR_TOL_TORCHVISION, f"{name} sample {b}: {error} from torchvision"
            wrong = (got["wrong_sigma"][b] - reference(b)).abs().max().item()
            assert wrong > 1e-3, f"{name} sample {b}: another sigma went unnoticed"
    # Each plane is blurred alone: a grey image stored once equals its three-channel form.
    assert torch.equal(results["fbank1"]["out"].expand(-1, 3, -1, -1), results["fbank3"]["out"])


def geometry_case() -> tuple[torch.Tensor, ...]:
    """(x, masks, spec, shift, crop): nine filterbank images with the spec's SpecAugment masks,
    shifts and crops; sample 0 has no mask and the whole image as its crop."""
    x = _fbank_images()[:, :1]
    x = torch.cat([x, x.flip(2), -x]).contiguous()
    n, _, frames, bins = x.shape
    t0, t1 = _spec_mask(n, frames, 192, seed=1)
    f0, f1 = _spec_mask(n, bins, 48, seed=2)
    masks = torch.stack([t0, t1, f0, f1], 1)
    spec = torch.tensor([False, True, True, False, True, True, True, False, True])
    shift = torch.randint(-frames, frames, (n,), generator=torch.Generator().manual_seed(3))
    crop = torch.stack(_crops("fbank", x, seed=4), 1)
    crop[0] = torch.tensor([0, 0, frames, bins])
    return x, masks, spec, shift, crop


def run_geometry(case: tuple, device: str) -> dict[str, torch.Tensor]:
    """``kernels.augment.fbank_geometry`` through the fused kernel on ``device`` (forced on a
    CPU, where it would take the torch path), and with top and left swapped."""
    x, masks, spec, shift, crop = case
    x = x.to(device)
    with mock.patch.object(J, "fused_path", lambda _: True):
        out = K.fbank_geometry(x, masks, spec, shift, crop)
        swapped = K.fbank_geometry(x, masks, spec, shift, swap_top_left(crop, x.shape[2:]))
    return {"out": out.cpu(), "swapped": swapped.cpu()}


def swap_top_left(crop: torch.Tensor, size) -> torch.Tensor:
    """The crops with top and left swapped (moved back inside the image where needed)."""
    top, left, height, width = crop.T
    top, left = left.clamp(max=size[0] - height), top.clamp(max=size[1] - width)
    return torch.stack([top, left, height, width], 1)


def geometry_reference(case: tuple, b: int) -> torch.Tensor:
    """torch and torchvision only: masks by slicing, torch.roll, F.resized_crop (antialiased)."""
    x, masks, spec, shift, crop = case
    image = x[b].clone()
    if spec[b]:
        t0, t1, f0, f1 = masks[b].tolist()
        image[:, t0:t1] = 0.0
        image[:, :, f0:f1] = 0.0
        image = torch.roll(image, int(shift[b]), 1)
    top, left, height, width = crop[b].tolist()
    size = list(x.shape[2:])
    return TF.resized_crop(image, top, left, height, width, size, antialias=True)


def check_geometry(case: tuple, results: dict) -> None:
    x = case[0]
    out = results["out"]
    assert out.shape == x.shape and out.dtype == torch.float32
    for b in range(len(x)):
        ref = geometry_reference(case, b)
        error = (out[b] - ref).abs().max().item()
        assert error <= GEOMETRY_TOL, f"sample {b}: {error} from the reference"
        if not torch.equal(swap_top_left(case[4], x.shape[2:])[b], case[4][b]):
            wrong = (results["swapped"][b] - ref).abs().max().item()
            assert wrong > 0.1, f"sample {b}: swapped top and left went unnoticed"
    assert torch.equal(out[0], x[0])  # no mask, whole-image crop: the image itself
    # And the torch path (the CPU's) agrees: the same function either way.
    torch_path = K.fbank_geometry(*case)
    assert (out - torch_path).abs().max().item() <= GEOMETRY_TOL


def roll_mask_case() -> tuple[torch.Tensor, ...]:
    """(x, shift, masks): nine filterbank images (T=300, F=128: not a multiple of a tile) with
    shifts of both signs and beyond T, the spec's SpecAugment bands (some empty), sample 0 with
    neither."""
    x = _fbank_images()[:, :1, :300]
    x = torch.cat([x, x.flip(2), -x]).contiguous()
    n, _, frames, bins = x.shape
    t0, t1 = _spec_mask(n, frames, 192, seed=5)
    f0, f1 = _spec_mask(n, bins, 48, seed=6)
    masks = torch.stack([t0, t1, f0, f1], 1)
    shift = torch.randint(-2 * frames, 2 * frames, (n,), generator=torch.Generator().manual_seed(7))
    masks[0], shift[0] = 0, 0
    masks[3, 1] = masks[3, 0]  # an empty time band
    return x, shift, masks


# A mask value other than 0: the normalised zero of the log-mel (-mean / std), as finetuning
# fills its bands (masked before the normalisation, as the original's recipe places them).
FILL = 4.346 / 4.332


def roll_mask_reference(case: tuple, b: int, fill: float = 0.0) -> torch.Tensor:
    """torch only: torch.roll, then the bands set to ``fill`` by slicing."""
    x, shift, masks = case
    image = torch.roll(x[b], int(shift[b]), dims=1)
    t0, t1, f0, f1 = masks[b].tolist()
    image[:, t0:t1] = fill
    image[:, :, f0:f1] = fill
    return image


def run_roll_mask(case: tuple, device: str) -> dict[str, torch.Tensor]:
    """``kernels.augment.roll_and_mask`` through the fused kernel on ``device`` (forced on a
    CPU) in tiles of 64 x 32 (partial ones at both edges), and with the shifts negated."""
    x, shift, masks = case
    x = x.to(device)
    before = x.clone()
    tiled = functools.partial(J.roll_mask_triton, tile=(64, 32))
    with (
        mock.patch.object(J, "fused_path", lambda _: True),
        mock.patch.object(J, "roll_mask_triton", tiled),
    ):
        out = K.roll_and_mask(x, shift, masks)
        negated = K.roll_and_mask(x, -shift, masks)
        filled = K.roll_and_mask(x, shift, masks, fill=FILL)
    return {
        "out": out.cpu(),
        "negated": negated.cpu(),
        "filled": filled.cpu(),
        "input_untouched": torch.tensor(torch.equal(x, before)),
    }


def check_roll_mask(case: tuple, results: dict) -> None:
    x, shift, masks = case
    out = results["out"]
    assert bool(results["input_untouched"])
    # Data movement only: bit for bit with torch, and with the torch path.
    for b in range(len(x)):
        assert torch.equal(out[b], roll_mask_reference(case, b)), b
        assert torch.equal(results["filled"][b], roll_mask_reference(case, b, FILL)), b
    assert torch.equal(out, K.roll_and_mask(x, shift, masks))
    assert torch.equal(results["filled"], K.roll_and_mask(x, shift, masks, fill=FILL))
    assert torch.equal(out[0], x[0])
    moved = (shift % x.shape[2] != 0) & (shift % x.shape[2] != x.shape[2] // 2)
    for b in moved.nonzero().flatten().tolist():  # a wrong roll direction is seen
        assert not torch.equal(results["negated"][b], out[b]), b


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def finish_case() -> tuple[torch.Tensor, ...]:
    """(x, flip, gray): colour images (60 x 84: not a multiple of a tile) with every flag pair."""
    x = _rgb_images(6, 60, 84, seed=6)
    flip = torch.tensor([True, False, True, False, True, False])
    gray = torch.tensor([False, True, True, False, False, True])
    return x, flip, gray


def run_finish(case: tuple, device: str) -> dict[str, torch.Tensor]:
    """``kernels.augment.finish_visual`` through the fused kernel on ``device`` (forced on a
    CPU), with the flags swapped, and whether the input stayed untouched (also with owned)."""
    x, flip, gray = case
    x = x.to(device)
    before = x.clone()
    with mock.patch.object(J, "fused_path", lambda _: True):
        out = K.finish_visual(x, flip, gray, *IMAGENET)
        owned = K.finish_visual(x, flip, gray, *IMAGENET, owned=True)
        swapped = K.finish_visual(x, gray, flip, *IMAGENET)
    return {
        "out": out.cpu(),
        "owned": owned.cpu(),
        "swapped": swapped.cpu(),
        "input_untouched": torch.tensor(torch.equal(x, before)),
    }


def check_finish(case: tuple, results: dict) -> None:
    x, flip, gray = case
    out = results["out"]
    assert bool(results["input_untouched"])  # a flip reads other columns: never in place
    assert torch.equal(results["owned"], out)
    # The same float32 operations as the torch path: bit for bit.
    assert torch.equal(out, K.finish_visual(x, flip, gray, *IMAGENET))
    for b in range(len(x)):
        ref = x[b]
        if flip[b]:
            ref = TF.hflip(ref)
        if gray[b]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        ref = TF.normalize(ref, *IMAGENET)
        assert (out[b] - ref).abs().max().item() <= 1e-6, b
        if flip[b] != gray[b]:  # swapped flags: another image
            assert (results["swapped"][b] - ref).abs().max().item() > 0.01, b


def transpose_case() -> tuple:
    """Two channel groups of an audio batch of 8 (T=40, F=24): five one-channel images for
    rows 0, 2, 3, 5, 7 and three three-channel images for rows 1, 4, 6, with flips."""
    gen = torch.Generator().manual_seed(8)
    x1 = torch.randn(5, 1, 40, 24, generator=gen)
    x3 = torch.randn(3, 3, 40, 24, generator=gen)
    groups = (
        (torch.tensor([0, 2, 3, 5, 7]), x1, torch.tensor([True, False, True, True, False])),
        (torch.tensor([1, 4, 6]), x3, torch.tensor([False, True, True])),
    )
    return groups, (8, 3, 24, 40)


def run_transpose(case: tuple, device: str, flips_swapped: bool = False) -> torch.Tensor:
    """``kernels.augment.flip_transpose_into`` for both groups into one output (fused: forced
    on a CPU); NaN where nothing was written."""
    groups, shape = case
    out = torch.full(shape, float("nan"), device=device)
    with mock.patch.object(J, "fused_path", lambda _: True):
        for rows, x, flip in groups:
            K.flip_transpose_into(out, rows, x.to(device).clone(), ~flip if flips_swapped else flip)
    return out.cpu()


def transpose_reference(case: tuple) -> torch.Tensor:
    groups, shape = case
    ref = torch.full(shape, float("nan"))
    for rows, x, flip in groups:
        for i, row in enumerate(rows.tolist()):
            image = x[i].flip(-1) if flip[i] else x[i]
            ref[row] = image.transpose(1, 2).expand(3, -1, -1)
    return ref


def check_transpose(case: tuple, results: dict) -> None:
    ref = transpose_reference(case)
    assert torch.equal(results["out"], ref)  # data movement only: bit for bit, every row written
    assert not torch.equal(results["swapped"], ref)


_SCRIPT = """
import torch
from tests.test_augment_triton import (
    blur_cases, finish_case, geometry_case, jitter_cases, roll_mask_case, run_blur, run_finish,
    run_geometry, run_jitter, run_roll_mask, run_transpose, transpose_case,
)
roll_mask = run_roll_mask(roll_mask_case(), "cpu")
jitter = run_jitter(jitter_cases(), "cpu")
blur = run_blur(blur_cases(), "cpu")
geometry = run_geometry(geometry_case(), "cpu")
finish = run_finish(finish_case(), "cpu")
transpose = {{
    "out": run_transpose(transpose_case(), "cpu"),
    "swapped": run_transpose(transpose_case(), "cpu", flips_swapped=True),
}}
torch.save(
    {{"jitter": jitter, "blur": blur, "geometry": geometry, "finish": finish,
      "transpose": transpose, "roll_mask": roll_mask}},
    {out!r},
)
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Both kernels' results on the test cases, run on the CPU under TRITON_INTERPRET=1."""
    out = tmp_path_factory.mktemp("triton") / "fused.pt"
    env = interpreter_env()
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(out=str(out))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


@needs_triton
def test_fused_jitter_under_interpreter(interpreted) -> None:
    """The jitter kernel on the CPU equals the torch path and torchvision."""
    check_jitter(jitter_cases(), interpreted["jitter"])


@needs_triton
def test_fused_blur_under_interpreter(interpreted) -> None:
    """The blur kernel on the CPU equals the torch path and torchvision."""
    check_blur(blur_cases(), interpreted["blur"])


@needs_triton
def test_fused_fbank_geometry_under_interpreter(interpreted) -> None:
    """Masks, roll and resized crop in one kernel on the CPU equal torch/torchvision's."""
    check_geometry(geometry_case(), interpreted["geometry"])


@needs_triton
def test_fused_roll_and_mask_under_interpreter(interpreted) -> None:
    """Finetuning's roll and masks in one kernel on the CPU: torch.roll and slicing exactly."""
    check_roll_mask(roll_mask_case(), interpreted["roll_mask"])


def test_roll_and_mask_torch_path_matches_the_reference() -> None:
    case = roll_mask_case()
    out = K.roll_and_mask(*case)
    filled = K.roll_and_mask(*case, fill=FILL)
    for b in range(len(out)):
        assert torch.equal(out[b], roll_mask_reference(case, b)), b
        assert torch.equal(filled[b], roll_mask_reference(case, b, FILL)), b
    assert (filled == FILL).sum() > (out == FILL).sum()  # the bands really hold the fill


@pytest.mark.parametrize("fused", [False, True])
def test_roll_and_mask_checks_its_parameters(fused) -> None:
    """A band outside the image is refused before anything runs (fused path: by its host
    checks, forced here); an empty band is no band."""
    x, shift, masks = roll_mask_case()
    with mock.patch.object(J, "fused_path", lambda _: fused):
        for column, value in ((1, x.shape[2] + 1), (3, x.shape[3] + 1), (2, -1)):
            bad = masks.clone()
            bad[1, column] = value
            with pytest.raises(ValueError, match="<="):
                K.roll_and_mask(x, shift, bad)
        with pytest.raises(ValueError, match="one-channel"):
            K.roll_and_mask(x.expand(-1, 3, -1, -1), shift, masks)
        with pytest.raises(ValueError, match="shape"):
            K.roll_and_mask(x, shift, masks[:, :3])


@needs_triton
def test_fused_finish_visual_under_interpreter(interpreted) -> None:
    """Flip, grayscale and normalisation in one kernel on the CPU: torch's numbers exactly."""
    check_finish(finish_case(), interpreted["finish"])


@needs_triton
def test_fused_flip_transpose_under_interpreter(interpreted) -> None:
    """The audio view's flip and transposed, channel-broadcast write in one kernel on the CPU."""
    check_transpose(transpose_case(), interpreted["transpose"])


def test_flip_transpose_torch_path_matches_the_reference(selection) -> None:
    case = transpose_case()
    groups, shape = case
    out = torch.full(shape, float("nan"))
    for rows, x, flip in groups:
        K.flip_transpose_into(out, rows, x.clone(), flip)
    assert torch.equal(out, transpose_reference(case))
    whole = torch.empty(2, 3, 24, 40)
    x = torch.randn(2, 1, 40, 24)
    K.flip_transpose_into(whole, None, x.clone(), torch.tensor([True, False]))
    assert torch.equal(whole[0], x[0].flip(-1).transpose(1, 2).expand(3, -1, -1))
    assert torch.equal(whole[1], x[1].transpose(1, 2).expand(3, -1, -1))
    with pytest.raises(ValueError, match="indices"):
        K.flip_transpose_into(whole, torch.tensor([0, 2]), x, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="all of out"):
        K.flip_transpose_into(whole, None, x[:1], torch.tensor([True]))
    with pytest.raises(ValueError, match="contiguous"):
        K.flip_transpose_into(whole.transpose(2, 3), None, x, torch.tensor([True, False]))


def test_fbank_geometry_torch_path_matches_the_reference() -> None:
    case = geometry_case()
    out = K.fbank_geometry(*case)
    for b in range(len(out)):
        assert torch.equal(out[b], geometry_reference(case, b)), b


@pytest.mark.parametrize("fused", [False, True])
def test_fbank_geometry_checks_its_parameters(fused) -> None:
    """Bad masks or crops are refused before anything runs (on the fused path by its own host
    checks: forced here, they run before the launch)."""
    x, masks, spec, shift, crop = geometry_case()
    with mock.patch.object(J, "fused_path", lambda _: fused):
        bad = masks.clone()
        bad[1, 1] = x.shape[2] + 1  # a time mask past the end, on a sample with masks on
        with pytest.raises(ValueError, match="<="):
            K.fbank_geometry(x, bad, spec, shift, crop)
        bad = crop.clone()
        bad[2, 0] = x.shape[2] - bad[2, 2] + 1  # the crop leaves the image
        with pytest.raises(ValueError, match="inside"):
            K.fbank_geometry(x, masks, spec, shift, bad)
        with pytest.raises(ValueError, match="one-channel"):
            K.fbank_geometry(x.expand(-1, 3, -1, -1), masks, spec, shift, crop)


_STAGE_SCRIPT = """
import dataclasses, sys
from unittest import mock
import torch
from dali_pipelines.loader import DaliLoader, LoaderConfig
from equiav.config import AugmentConfig
from equiav.data.index import read_dataset, read_label_csv
import kernels.augment as K
import kernels.augment_triton as J

root, labels, out = sys.argv[1:4]
aug = dataclasses.replace(
    AugmentConfig(), specaug_p=1.0, jitter_p=1.0, blur_p=1.0, flip_p=0.5, gray_p=0.5
)
cfg = LoaderConfig(batch_size=4, mode="pretrain", seed=3, frames_per_clip=4, eval_frame=2,
                   augment=aug, cen_num=2)
loader = DaliLoader(read_dataset(root + "/train.json"), read_label_csv(labels), cfg)
raw = loader.unpacked({{k: v.clone() for k, v in next(iter(loader.iterator))[0].items()}})
torch_stage = loader._device_stage(raw)
with mock.patch.object(K, "whole_batch_ops", lambda x: True), mock.patch.object(
    J, "fused_path", lambda x: True
):
    fused_stage = loader._device_stage(raw)
torch.save({{"torch": torch_stage, "fused": fused_stage, "t_a": raw["t_a"]}}, out)
"""


@needs_triton
def test_the_loader_stage_through_the_fused_kernels_equals_the_cpu_stage(synth_small, tmp_path):
    """The pretraining device stage of one real batch (DALI-decoded, every augmentation on) as a
    GPU runs it (whole-batch policy, every fused kernel, under the interpreter) equals the CPU
    stage: the wiring of the fused paths (one three-channel audio batch, finish_visual, ...),
    not only each kernel. Tolerance: 1e-4 in normalised units, as the truthfulness test."""
    out = tmp_path / "stage.pt"
    env = interpreter_env()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _STAGE_SCRIPT.format(),
            str(synth_small.root),
            str(synth_small.label_csv),
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(out)
    ref, fused = got["torch"], got["fused"]
    assert ref.keys() == fused.keys()
    hue_first = (got["t_a"][:, 12] > 0) & (got["t_a"][:, 13] == 3)
    for key in ref:
        if key in ("audio_aug", "visual_aug"):
            assert fused[key].is_contiguous(), key
            error = (fused[key] - ref[key]).abs().max().item()
            assert error <= 1e-4, f"{key}: the fused stage differs by {error}"
        else:
            assert torch.equal(fused[key], ref[key]), key
    assert ref["audio_aug"].shape == (4, 3, 128, ref["audio_aug"].shape[3])
    # Samples without hue first kept equal channels through the three-channel path.
    for b in (~hue_first).nonzero().flatten().tolist():
        assert torch.equal(fused["audio_aug"][b, 1], fused["audio_aug"][b, 0])


_F32 = {"x_ptr": "*fp32", "out_ptr": "*fp32", "params_ptr": "*fp32"}
_I32 = ("pixels", "stride_b", "stride_c", "tiles")
_BLUR_PTRS = ("src_ptr", "dst_ptr", "orig_ptr", "params_ptr")
_BLUR_INTS = ("channels", "height", "width", "stride_b", "stride_c", "kmax")
_NORM = ("m0", "m1", "m2", "s0", "s1", "s2")
# kernel name -> (signature, constexprs) for each compiled variant
_VARIANTS = (
    {
        f"jitter-{channels}ch": (
            "_jitter_kernel",
            {**_F32, "partial_ptr": "*fp32", **dict.fromkeys(_I32, "i32")},
            {
                "CHANNELS": channels,
                "BLOCK": 1024,
                "TILES": 64,
                "COPY_INACTIVE": True,
                "PARAMS": J._PARAMS,
            },
        )
        for channels in (1, 3)
    }
    | {
        f"jitter-mean-{channels}ch": (
            "_jitter_mean_kernel",
            {
                "x_ptr": "*fp32",
                "partial_ptr": "*fp32",
                "params_ptr": "*fp32",
                **dict.fromkeys(_I32, "i32"),
            },
            {"CHANNELS": channels, "BLOCK": 1024, "PARAMS": J._PARAMS},
        )
        for channels in (1, 3)
    }
    | {
        f"blur-{'vertical' if vertical else 'horizontal'}": (
            "_blur_kernel",
            {**dict.fromkeys(_BLUR_PTRS, "*fp32"), **dict.fromkeys(_BLUR_INTS, "i32")},
            {"VERTICAL": vertical, "COPY_INACTIVE": True, "BLOCK_H": 16, "BLOCK_W": 64},
        )
        for vertical in (True, False)
    }
    | {
        "fbank-geometry": (
            "_geometry_kernel",
            {**_F32, "frames": "i32", "bins": "i32"},
            {"PARAMS": 10, "BLOCK_H": 32, "BLOCK_W": 64},
        ),
        "finish-visual": (
            "_finish_kernel",
            {**_F32, "height": "i32", "width": "i32", **dict.fromkeys(_NORM, "fp32")},
            {"BLOCK_H": 16, "BLOCK_W": 64},
        ),
    }
    | {
        "roll-mask": (
            "_roll_mask_kernel",
            {**_F32, "params_ptr": "*i32", "frames": "i32", "bins": "i32", "fill": "fp32"},
            {"BLOCK_H": 32, "BLOCK_W": 64},
        ),
    }
    | {
        f"flip-transpose-{channels}ch": (
            "_flip_transpose_kernel",
            {**_F32, "frames": "i32", "bins": "i32"},
            {"CHANNELS": channels, "BLOCK_F": 32, "BLOCK_T": 64},
        )
        for channels in (1, 3)
    }
)


@needs_triton
@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_fused_kernels_compile_for_hopper_with_torch_rounding(variant):
    """Compiled ahead of time for sm_90 (no GPU needed): each kernel builds, and its PTX has no
    fused multiply-add and only IEEE round-to-nearest division (as torch's kernels round)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constants = _VARIANTS[variant]
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(fn=getattr(J, name), signature=signature, constexprs=constants)
    target = GPUTarget("cuda", 90, 32)
    options = {"num_warps": J._NUM_WARPS, "enable_fp_fusion": False}
    ptx = J.triton.compile(source, target=target, options=options).asm["ptx"]
    assert "fma." not in ptx
    assert "div.full" not in ptx and "div.approx" not in ptx
    if name == "_jitter_kernel" or variant == "jitter-mean-3ch":  # the mean pass of a grey
        # image has no hue, so no division at all
        assert re.search(r"div\.rn(\.ftz)?\.f32", ptx)
    if name in ("_flip_transpose_kernel", "_roll_mask_kernel"):
        return  # moves data only: no arithmetic on the values to round
    # The check can fail: the same kernel with fusion allowed has multiply-adds.
    options["enable_fp_fusion"] = True
    assert "fma." in J.triton.compile(source, target=target, options=options).asm["ptx"]


def test_fused_kernels_only_for_cuda_tensors():
    x = torch.zeros(1, 3, 4, 4)
    assert not J.fused_path(x)
    if torch.cuda.is_available() and J.triton is not None:
        assert J.fused_path(x.cuda())


@pytest.mark.cuda
@needs_triton
def test_fused_kernels_on_cuda():
    check_jitter(jitter_cases(), run_jitter(jitter_cases(), "cuda"))
    check_blur(blur_cases(), run_blur(blur_cases(), "cuda"))
    # kernels.augment dispatches to them on CUDA: the CPU's torch-path numbers.
    x, order, factors, active = jitter_cases()["rgb"]
    got = K.color_jitter(x.cuda(), order.cuda(), factors.cuda(), active.cuda()).cpu()
    assert (got - K.color_jitter(x, order, factors, active)).abs().max().item() <= TOL_TORCH
    x, sigma, sizes, active = blur_cases()["rgb"]
    got = K.gaussian_blur(x.cuda(), sigma, sizes, active).cpu()
    error = (got - K.gaussian_blur(x, sigma, sizes, active)).abs().max().item()
    assert error <= BLUR_TOL_TORCH
    check_geometry(geometry_case(), run_geometry(geometry_case(), "cuda"))
    check_finish(finish_case(), run_finish(finish_case(), "cuda"))
    transpose = {
        "out": run_transpose(transpose_case(), "cuda"),
        "swapped": run_transpose(transpose_case(), "cuda", flips_swapped=True),
    }
    check_transpose(transpose_case(), transpose)
    check_roll_mask(roll_mask_case(), run_roll_mask(roll_mask_case(), "cuda"))
    assert J.fused_path(torch.zeros(1, device="cuda"))  # so the pipeline takes the kernels
