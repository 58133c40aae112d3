"""kernels.gelu (model.gelu: triton): the Triton GELU kernels against the exact function in
float64 and against torch's GELU, their autograd wiring, the CPU path (torch's GELU, compiled
too), the model built with them, and their code for an H100/H200 (sm_90).

The kernels run on the CPU under TRITON_INTERPRET=1 in a subprocess (the variable must be set
before triton decorates them). The interpreter computes exp2 and the division exactly where the
GPU uses its fast instructions (~2 ulp each, checked on CUDA in the test marked `cuda`), and it
truncates float32 to bfloat16 where the GPU rounds to nearest (`cvt.rn`, checked in the sm_90
code): its bfloat16 results are compared within one bfloat16 ulp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels.gelu as G

REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(G.triton is None, reason="triton is not installed")

# Relative to max(1, |x|): torch's own float32 GELU is within 1.5e-7 of the exact function
# and its derivative within 2.7e-7; on an H200 (the fast exp2 and division, ~2 ulp each) the
# kernels measured 1.7e-7 and 3.1e-7.
FORWARD_TOL = 3e-7
BACKWARD_TOL = 4e-7


def sample_inputs(generator: torch.Generator) -> torch.Tensor:
    """A dense sweep, normal draws at three scales, and edge values (zeros, denormals, huge)."""
    edges = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-20, -1e-20, 1e30, -1e30, 40.0, -40.0])
    return torch.cat(
        [
            torch.linspace(-12, 12, 24001),
            torch.randn(30000, generator=generator) * 0.3,
            torch.randn(30000, generator=generator) * 3,
            torch.randn(30000, generator=generator) * 30,
            edges,
        ]
    )


def exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(x) and dGELU/dx(x) in float64 (Phi from erfc: 1 + erf cancels in the tail)."""
    x = x.double()
    cdf = 0.5 * torch.special.erfc(-x / 2**0.5)
    pdf = torch.exp(-x * x / 2) / (2 * torch.pi) ** 0.5
    return x * cdf, cdf + x * pdf


def relative_error(
    value: torch.Tensor, reference: torch.Tensor, x: torch.Tensor, grad: torch.Tensor | None = None
) -> float:
    """max |value - reference| / (max(1, |x|) max(1, |grad|))."""
    scale = x.double().abs().clamp(min=1)
    if grad is not None:
        scale = scale * grad.double().abs().clamp(min=1)
    return ((value.double() - reference) / scale).abs().max().item()


def within_one_bf16_ulp(value: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether bfloat16 `value` is the (float64) `reference` rounded either way, give or take
    the float32 computation's absolute error: one bfloat16 ulp plus FORWARD_TOL x max(1, |x|)
    (which matters where the result is tiny: GELU's far negative tail, where torch's float32
    GELU gives 0, and the derivative's zero near x = -0.75, where two terms cancel)."""
    v, r = value.double(), reference.double()
    ulp = torch.where(r == 0, 0.0, 2.0 ** (torch.floor(torch.log2(r.abs())) - 7))
    allowed = ulp + FORWARD_TOL * x.double().abs().clamp(min=1)
    return bool(((v - r).abs() <= allowed).all())


INTERPRETED = """
import json, os, sys
import torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
from kernels.gelu import gelu, gelu_backward, triton_path
from tests.test_gelu import exact, relative_error, sample_inputs, within_one_bf16_ulp

g = torch.Generator().manual_seed(0)
x = sample_inputs(g)
grad = torch.randn(x.shape, generator=g)
assert triton_path(x)
value, slope = exact(x)
out = {{
    "forward": relative_error(gelu(x), value, x),
    "torch_forward": relative_error(F.gelu(x), value, x),
    "backward": relative_error(gelu_backward(grad, x), grad.double() * slope, x, grad),
    "torch_backward": relative_error(
        torch.ops.aten.gelu_backward(grad, x), grad.double() * slope, x, grad
    ),
}}
leaf = x.clone().requires_grad_()
gelu(leaf).backward(grad)
out["autograd_is_the_backward_kernel"] = torch.equal(leaf.grad, gelu_backward(grad, x))
special = torch.tensor([float("nan"), float("inf"), -float("inf")])
out["special"] = [str(v) for v in gelu(special).tolist()]
out["torch_special"] = [str(v) for v in F.gelu(special).tolist()]
xb, gb = x.bfloat16(), grad.bfloat16()
value_b, slope_b = exact(xb)
out["bf16_forward_within_one_ulp"] = within_one_bf16_ulp(gelu(xb), value_b, xb)
out["bf16_backward_within_one_ulp"] = within_one_bf16_ulp(
    gelu_backward(gb, xb), gb.double() * slope_b, xb * gb.float().abs().clamp(min=1)
)
out["bf16_dtype"] = str(gelu(xb).dtype)
strided = torch.randn(64, 48, generator=g).t()  # not contiguous
out["strided"] = relative_error(gelu(strided), exact(strided)[0], strided)
out["empty"] = list(gelu(torch.empty(0, 3)).shape)

# bias_gelu: rows and columns past whole tiles (32 x 128, 8 tiles a program in the backward)
from kernels.gelu import bias_gelu, bias_gelu_backward
h = torch.randn(3, 97, 300, generator=g) * 3
b = torch.randn(300, generator=g)
grad = torch.randn(h.shape, generator=g)
value, slope = exact(h + b)  # h + b rounded to float32 first, as the kernel adds them
dh, db = bias_gelu_backward(grad, h, b)
out["bias_forward"] = relative_error(bias_gelu(h, b), value, h + b)
out["bias_backward"] = relative_error(dh, grad.double() * slope, h + b, grad)
want_db = (grad.double() * slope).reshape(-1, 300).sum(0)
out["bias_db"] = ((db.double() - want_db).abs() / want_db.abs().clamp(min=1)).max().item()
leaf_h, leaf_b = h.clone().requires_grad_(), b.clone().requires_grad_()
bias_gelu(leaf_h, leaf_b).backward(grad)
out["bias_autograd"] = torch.equal(leaf_h.grad, dh) and torch.equal(leaf_b.grad, db)
hb = h.bfloat16()  # autocast: bfloat16 activations, a float32 bias
yb, (dhb, dbb) = bias_gelu(hb, b), bias_gelu_backward(grad.bfloat16(), hb, b)
out["bias_dtypes"] = [str(t.dtype) for t in (yb, dhb, dbb)]
out["bias_bf16_within_one_ulp"] = within_one_bf16_ulp(yb, exact(hb.float() + b)[0], hb.float() + b)
out["bias_empty"] = [list(t.shape) for t in bias_gelu_backward(*[torch.empty(0, 5)] * 2, b[:5])]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The kernels' numbers on the CPU interpreter (one subprocess)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED.format(repo=str(REPO))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
def test_kernels_compute_the_exact_gelu_and_its_derivative(interpreted):
    assert interpreted["forward"] < FORWARD_TOL, interpreted
    assert interpreted["backward"] < BACKWARD_TOL, interpreted
    # As close as torch's own float32 GELU (1.5e-7 of max(1, |x|) here; in the far negative
    # tail torch's is 0, 1 + erf cancelling, where these give the tiny exact value)
    assert interpreted["forward"] < 1.5 * interpreted["torch_forward"]
    assert interpreted["backward"] < 1.5 * interpreted["torch_backward"]
    # nan, inf, -inf: nan, inf, nan (-inf x 0), as torch 2.9's float32 GELU (2.11's CPU gives
    # nan at inf too)
    assert interpreted["special"] == ["nan", "inf", "nan"], interpreted["torch_special"]
    assert interpreted["strided"] < FORWARD_TOL and interpreted["empty"] == [0, 3]


@needs_triton
def test_bias_gelu_kernels_compute_gelu_of_the_sum_and_the_bias_gradient(interpreted):
    """bias_gelu (model.gelu: triton-bias): GELU(h + b) and its derivative as close to the exact
    function as the plain kernels, the bias gradient (float32 column sums of the backward
    kernel's tiles, then over programs) within float32 summation error, and autograd through
    the backward op."""
    assert interpreted["bias_forward"] < FORWARD_TOL, interpreted
    assert interpreted["bias_backward"] < BACKWARD_TOL, interpreted
    assert interpreted["bias_db"] < 1e-5, interpreted  # 291 rows summed in float32
    assert interpreted["bias_autograd"]
    assert interpreted["bias_dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert interpreted["bias_bf16_within_one_ulp"]
    assert interpreted["bias_empty"] == [[0, 5], [5]]


@needs_triton
def test_kernels_in_bfloat16_and_their_autograd(interpreted):
    assert interpreted["bf16_dtype"] == "torch.bfloat16"
    assert interpreted["bf16_forward_within_one_ulp"]
    assert interpreted["bf16_backward_within_one_ulp"]
    assert interpreted["autograd_is_the_backward_kernel"]


def test_cpu_path_is_torch_gelu_eager_and_compiled():
    """Without CUDA (and the interpreter) `gelu` is torch's GELU: the same values and
    gradients bit for bit, also as a custom op inside a compiled graph."""
    assert not G.triton_path(torch.zeros(1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 33, generator=g)
    grad = torch.randn(7, 33, generator=g)

    def value_and_grad(fn):
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        y.backward(grad)
        return y.detach(), leaf.grad

    want = value_and_grad(nn.GELU())
    for got in (value_and_grad(G.GELU()), value_and_grad(torch.compile(G.GELU(), fullgraph=True))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cpu_path_of_bias_gelu_is_torch_gelu_of_the_sum():
    """Without CUDA `bias_gelu` is torch's GELU of h + b (bit for bit), its gradient in h
    torch's, in b the sum over the rows (also compiled); a bias of the wrong size is refused."""
    assert not G._bias_gelu_path(torch.zeros(2, 3), torch.zeros(3))
    g = torch.Generator().manual_seed(2)
    h, b = torch.randn(4, 5, 33, generator=g), torch.randn(33, generator=g)
    grad = torch.randn(h.shape, generator=g)

    def value_and_grads(fn):
        leaf_h, leaf_b = h.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(leaf_h, leaf_b)
        y.backward(grad)
        return y.detach(), leaf_h.grad, leaf_b.grad

    want = value_and_grads(lambda h, b: torch.nn.functional.gelu(h + b))
    for got in (
        value_and_grads(G.bias_gelu),
        value_and_grads(torch.compile(G.bias_gelu, fullgraph=True)),
    ):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="bias"):
        G.bias_gelu(h, torch.zeros(32))


def test_model_with_triton_gelu_is_the_same_model():
    """`model.gelu: triton` changes the towers' activation module, not the weights or (on the
    CPU) the outputs."""
    from equiav.config import apply_overrides, default_config, validate
    from equiav.model import EquiAVFinetune
    from equiav.model.vit import BiasGELUMlp

    small = {
        "model.embed_dim": 32,
        "model.depth": 1,
        "model.num_heads": 2,
        "data.image_size": 32,
        "data.target_length": 64,
        "augment.time_mask": 16,
        "augment.ft_timem": 16,
    }
    cfgs = [
        validate(apply_overrides(default_config("finetune"), {**small, "model.gelu": gelu}))
        for gelu in ("torch", "triton", "triton-bias")
    ]
    torch.manual_seed(0)
    plain = EquiAVFinetune(cfgs[0].model, cfgs[0].data, 5).eval()
    torch.manual_seed(0)
    triton_model = EquiAVFinetune(cfgs[1].model, cfgs[1].data, 5).eval()
    torch.manual_seed(0)
    bias_model = EquiAVFinetune(cfgs[2].model, cfgs[2].data, 5).eval()
    acts = [type(m) for m in triton_model.modules() if isinstance(m, nn.GELU | G.GELU)]
    assert acts and set(acts) == {G.GELU}
    mlps = [m for m in bias_model.modules() if isinstance(m, BiasGELUMlp)]
    assert len(mlps) == 2 and not any(isinstance(m, nn.GELU | G.GELU) for m in bias_model.modules())
    for model in (triton_model, bias_model):
        assert plain.state_dict().keys() == model.state_dict().keys()
        model.load_state_dict(plain.state_dict())
    audio = torch.randn(2, 3, 128, 64)
    visual = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = plain(audio, visual)
        assert torch.equal(want, triton_model(audio, visual))
        # fc1 as a GEMM, then the bias: a rounding apart from the GEMM that adds it
        torch.testing.assert_close(bias_model(audio, visual), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="model.gelu"):
        validate(apply_overrides(default_config("finetune"), {"model.gelu": "fast"}))


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_with_fast_exp_and_no_erf(dtype):
    """Compiled ahead of time for sm_90 (no GPU needed): the GPU's fast exp2 and division, no
    libdevice erf, and float32 -> bfloat16 rounded to nearest."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    tiles = {"BM": G._BM, "BN": G._BN}
    kernels = [  # (kernel, its arguments' types, constexprs); the bias in float32 (autocast)
        (G._gelu_kernel, [f"*{dtype}"] * 2 + ["i32"], {"BLOCK": G._BLOCK}),
        (G._gelu_backward_kernel, [f"*{dtype}"] * 3 + ["i32"], {"BLOCK": G._BLOCK}),
        (G._bias_gelu_kernel, [f"*{dtype}", "*fp32", f"*{dtype}", "i32", "i32"], tiles),
        (
            G._bias_gelu_backward_kernel,
            [f"*{dtype}"] * 2 + ["*fp32", f"*{dtype}", "*fp32", "i32", "i32"],
            {**tiles, "TILES": G._TILES},
        ),
    ]
    for kernel, types, constexprs in kernels:
        names = list(kernel.arg_names)
        types = types + ["constexpr"] * len(constexprs)
        signature = dict(zip(names, types, strict=True))
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        ptx = G.triton.compile(source, target=target, options={"num_warps": G._NUM_WARPS}).asm[
            "ptx"
        ]
        assert re.search(r"ex2\.approx", ptx) and "div.full.f32" in ptx
        assert "erf" not in ptx
        if dtype == "bf16":
            assert "cvt.rn.bf16.f32" in ptx


@pytest.mark.cuda
def test_kernels_on_cuda():
    """On the GPU (fast exp2 and division): float32 within 3e-7 x max(1, |x|) of the exact
    function, bfloat16 within one ulp of torch's, and a compiled model step runs."""
    g = torch.Generator().manual_seed(0)
    x = sample_inputs(g).cuda()
    grad = torch.randn(x.shape, generator=g).cuda()
    value, slope = exact(x)
    assert relative_error(G.gelu(x), value, x) < FORWARD_TOL
    backward = relative_error(G.gelu_backward(grad, x), grad.double() * slope, x, grad)
    torch_backward = relative_error(
        torch.ops.aten.gelu_backward(grad, x), grad.double() * slope, x, grad
    )
    assert backward < BACKWARD_TOL, (backward, torch_backward)
    xb = x.bfloat16()
    assert within_one_bf16_ulp(G.gelu(xb), exact(xb)[0], xb)
    mlp = nn.Sequential(nn.Linear(64, 256), G.GELU(), nn.Linear(256, 64)).cuda()
    compiled = torch.compile(mlp)
    inputs = torch.randn(8, 64, device="cuda", requires_grad=True)
    compiled(inputs).sum().backward()
    reference = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda()
    reference.load_state_dict(mlp.state_dict())
    leaf = inputs.detach().clone().requires_grad_()
    reference(leaf).sum().backward()
    torch.testing.assert_close(inputs.grad, leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_bias_gelu_on_cuda():
    """bias_gelu on the GPU: GELU(h + b) and its gradients as close to the exact function as
    the plain kernels, the bias gradient against float64, bfloat16 activations with a float32
    bias (autocast); and BiasGELUMlp compiled against timm's Mlp, weights, inputs and gradients
    alike."""
    from timm.layers import Mlp

    from equiav.model.vit import BiasGELUMlp

    g = torch.Generator().manual_seed(3)
    h = (torch.randn(4, 513, 3072, generator=g) * 3).cuda()
    b = torch.randn(3072, generator=g).cuda()
    grad = torch.randn(h.shape, generator=g).cuda()
    value, slope = exact(h + b)
    dh, db = G.bias_gelu_backward(grad, h, b)
    assert relative_error(G.bias_gelu(h, b), value, h + b) < FORWARD_TOL
    assert relative_error(dh, grad.double() * slope, h + b, grad) < BACKWARD_TOL
    want_db = (grad.double() * slope).reshape(-1, 3072).sum(0)
    assert ((db.double() - want_db).abs() / want_db.abs().clamp(min=1)).max() < 1e-4
    hb = h.bfloat16()
    yb = G.bias_gelu(hb, b)
    assert yb.dtype == torch.bfloat16 and within_one_bf16_ulp(yb, exact(hb.float() + b)[0], hb + b)
    torch.manual_seed(0)
    mlp = BiasGELUMlp(64, 256).cuda()
    reference = Mlp(64, 256).cuda()
    reference.load_state_dict(mlp.state_dict())
    inputs = torch.randn(8, 10, 64, device="cuda", requires_grad=True)
    torch.compile(mlp)(inputs).sum().backward()
    leaf = inputs.detach().clone().requires_grad_()
    reference(leaf).sum().backward()
    torch.testing.assert_close(inputs.grad, leaf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp.fc1.bias.grad, reference.fc1.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp.fc1.weight.grad, reference.fc1.weight.grad, rtol=1e-5, atol=1e-5)
