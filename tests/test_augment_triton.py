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

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import augment as K
from kernels import augment_triton as J
from tests.test_augment_kernels import (
    TV_JITTER,
    _blur_reference,
    _fbank_images,
    _jitter_params,
    _rgb_images,
)

REPO = Path(__file__).resolve().parents[1]
TOL_TORCH = 1e-5
TOL_TORCHVISION = 1e-5
BLUR_TOL_TORCH = 1e-6
BLUR_TOL_TORCHVISION = 5e-6
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
        out = J.color_jitter_triton(x, *args)
        mine = x.clone()
        owned = J.color_jitter_triton(mine, *args, owned=True)
        neutral = factors.float().clone()
        neutral[:, 1] = 1.0  # contrast's mean drops out: the rest must round as torch does
        results[name] = {
            "out": out.cpu(),
            "contrast_1": J.color_jitter_triton(x, args[0], neutral.numpy(), args[2]).cpu(),
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
    own = torch.where(active, sizes, 1)
    weights = K._gaussian_kernels(torch.where(active, sigma, 1.0), int(own.max()), own)
    return weights, own


def run_blur(cases: dict, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each case through ``gaussian_blur_triton`` on ``device`` (see ``run_jitter``), and with
    the sigmas shifted by one sample (a wrong parameter, which the check must notice)."""
    results = {}
    for name, (x, sigma, sizes, active) in cases.items():
        x = x.to(device)
        before = x.clone()
        weights, own = _blur_weights(sigma, sizes, active)
        out = J.gaussian_blur_triton(x, weights, own, active)
        mine = x.clone()
        owned = J.gaussian_blur_triton(mine, weights, own, active, owned=True)
        wrong, _ = _blur_weights(sigma.roll(1), sizes, active)
        results[name] = {
            "out": out.cpu(),
            "wrong_sigma": J.gaussian_blur_triton(x, wrong, own, active).cpu(),
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


_SCRIPT = """
import torch
from tests.test_augment_triton import blur_cases, jitter_cases, run_blur, run_jitter
jitter = run_jitter(jitter_cases(), "cpu")
blur = run_blur(blur_cases(), "cpu")
torch.save({{"jitter": jitter, "blur": blur}}, {out!r})
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Both kernels' results on the test cases, run on the CPU under TRITON_INTERPRET=1."""
    out = tmp_path_factory.mktemp("triton") / "fused.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
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


_F32 = {"x_ptr": "*fp32", "out_ptr": "*fp32", "params_ptr": "*fp32"}
_I32 = ("pixels", "stride_b", "stride_c")
_BLUR_PTRS = ("src_ptr", "dst_ptr", "orig_ptr", "params_ptr")
_BLUR_INTS = ("channels", "height", "width", "stride_b", "stride_c")
# kernel name -> (signature, constexprs) for each compiled variant
_VARIANTS = {
    f"jitter-{channels}ch": (
        "_jitter_kernel",
        {**_F32, **dict.fromkeys(_I32, "i32")},
        {"CHANNELS": channels, "BLOCK": 1024, "COPY_INACTIVE": True, "PARAMS": J._PARAMS},
    )
    for channels in (1, 3)
} | {
    f"blur-{'vertical' if vertical else 'horizontal'}": (
        "_blur_kernel",
        {**dict.fromkeys(_BLUR_PTRS, "*fp32"), **dict.fromkeys(_BLUR_INTS, "i32")},
        {"KMAX": 13, "VERTICAL": vertical, "COPY_INACTIVE": True, "BLOCK_H": 16, "BLOCK_W": 64},
    )
    for vertical in (True, False)
}


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
    if name == "_jitter_kernel":
        assert re.search(r"div\.rn(\.ftz)?\.f32", ptx)
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
