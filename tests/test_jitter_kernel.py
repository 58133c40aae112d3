"""The fused Triton colour jitter (kernels.jitter, the GPU path of kernels.augment.color_jitter)
against the torch path, which equals torchvision bit for bit (tests/test_augment_kernels.py).

The kernel runs on the CPU under TRITON_INTERPRET=1 in a subprocess (the variable must be set
before triton decorates the kernel), is compiled for an H100 (sm_90) without a GPU to check that
it builds and keeps torch's rounding (no fused multiply-adds, IEEE division), and runs on CUDA in
the tests marked `cuda`. The kernel rounds every op as the torch path does, so with contrast's
factor at 1 (its mean then drops out of the blend) it equals the torch path bit for bit (on the
CPU interpreter; on a GPU up to denormals, see kernels.jitter). Otherwise the one difference is
the order of contrast's mean sum (a few ulp of the mean), which a later hue amplifies on
near-grey pixels (1.4e-6 seen): 1e-5 against the torch path and against torchvision, as for the
torch path; inactive samples bit for bit.
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
from kernels import jitter as J
from tests.test_augment_kernels import TV_JITTER, _fbank_images, _jitter_params, _rgb_images

REPO = Path(__file__).resolve().parents[1]
TOL_TORCH = 1e-5
TOL_TORCHVISION = 1e-5
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


def run_fused(cases: dict, device: str) -> dict[str, dict[str, torch.Tensor]]:
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


def check_fused(cases: dict, results: dict) -> None:
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


_SCRIPT = """
import torch
from tests.test_jitter_kernel import jitter_cases, run_fused
torch.save(run_fused(jitter_cases(), "cpu"), {out!r})
"""


@needs_triton
def test_fused_jitter_under_interpreter(tmp_path: Path) -> None:
    """The kernel on the CPU (TRITON_INTERPRET=1) equals the torch path and torchvision."""
    out = tmp_path / "fused.pt"
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
    check_fused(jitter_cases(), torch.load(out))


@needs_triton
@pytest.mark.parametrize("channels", [1, 3])
def test_fused_jitter_compiles_for_hopper_with_torch_rounding(channels):
    """Compiled ahead of time for sm_90 (no GPU needed): it builds, and its PTX has no fused
    multiply-add and only IEEE round-to-nearest division (as torch's kernels round)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "x_ptr": "*fp32",
        "out_ptr": "*fp32",
        "params_ptr": "*fp32",
        "pixels": "i32",
        "stride_b": "i32",
        "stride_c": "i32",
        "CHANNELS": "constexpr",
        "BLOCK": "constexpr",
        "COPY_INACTIVE": "constexpr",
        "PARAMS": "constexpr",
    }
    constants = {"CHANNELS": channels, "BLOCK": 1024, "COPY_INACTIVE": True, "PARAMS": J._PARAMS}
    source = ASTSource(fn=J._jitter_kernel, signature=signature, constexprs=constants)
    options = {"num_warps": J._NUM_WARPS, "enable_fp_fusion": False}
    ptx = J.triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert "fma." not in ptx
    assert "div.full" not in ptx and "div.approx" not in ptx
    assert re.search(r"div\.rn(\.ftz)?\.f32", ptx)
    # The check can fail: the same kernel with fusion allowed has multiply-adds.
    options["enable_fp_fusion"] = True
    fused = J.triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert "fma." in fused.asm["ptx"]


def test_color_jitter_takes_the_fused_kernel_only_on_cuda():
    x = torch.zeros(1, 3, 4, 4)
    assert not J.fused_path(x)
    if torch.cuda.is_available() and J.triton is not None:
        assert J.fused_path(x.cuda())


@pytest.mark.cuda
@needs_triton
def test_fused_jitter_on_cuda():
    cases = jitter_cases()
    check_fused(cases, run_fused(cases, "cuda"))
    # color_jitter dispatches to it on CUDA: the same numbers as the CPU's torch path.
    x, order, factors, active = cases["rgb"]
    got = K.color_jitter(x.cuda(), order.cuda(), factors.cuda(), active.cuda()).cpu()
    assert (got - K.color_jitter(x, order, factors, active)).abs().max().item() <= TOL_TORCH
