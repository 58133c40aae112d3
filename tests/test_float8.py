"""kernels/float8.py: float8 GEMMs for the towers' linear layers (model.linear=float8).

Each GEMM is checked against the same product computed in float64 from the dequantised float8
operands (what the GEMM must compute exactly, up to its output's rounding), and against the true
float64 linear (how far float8 moves the numbers). CUDA's operand rules are enforced on every
device, so these CPU tests catch a layout the GPU kernel would refuse; the `cuda` test runs the
real kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from equiav.config import DataConfig, ModelConfig
from equiav.model.vit import build_audio_tower, use_float8_linears
from kernels.float8 import (
    E4M3,
    E5M2,
    Float8Linear,
    float8_linear,
    scaled_mm,
    to_float8,
)


def _deq(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the GEMM sees it: rounded to ``dtype`` with its tensorwise scale, in float64."""
    x8, inv = to_float8(x, dtype)
    return x8.double() * inv.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(seed: int = 0, rows: int = 64, k: int = 96, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows // 2, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    return x, w, b


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_to_float8_rounds_within_the_formats_precision(dtype):
    x = torch.randn(4096) * torch.logspace(-3, 3, 4096)
    x8, inv = to_float8(x, dtype)
    assert x8.dtype == dtype
    assert x8.float().abs().max().item() == torch.finfo(dtype).max  # the amax meets the top
    mantissa = 3 if dtype == E4M3 else 2
    back = x8.float() * inv
    # relative half-ulp for normal numbers; below the smallest normal an absolute step
    tiny = torch.finfo(dtype).smallest_normal * inv.item()
    assert torch.all((back - x).abs() <= 2.0 ** -(mantissa + 1) * x.abs() + tiny)
    zero8, zero_inv = to_float8(torch.zeros(8), dtype)
    assert torch.isfinite(zero_inv) and zero8.float().abs().sum() == 0


def test_scaled_mm_enforces_cudas_operand_rules_on_any_device():
    a = torch.randn(32, 64).to(E4M3)
    b = torch.randn(48, 64).to(E4M3).t()  # column-major, as CUDA wants
    one = torch.tensor(1.0)
    assert scaled_mm(a, b, one, one, torch.float32).shape == (32, 48)
    with pytest.raises(ValueError, match="column-major"):
        scaled_mm(a, b.contiguous(), one, one, torch.float32)
    with pytest.raises(ValueError, match="row-major"):
        scaled_mm(a.t().contiguous().t(), b, one, one, torch.float32)
    with pytest.raises(ValueError, match="e5m2 x e5m2"):
        scaled_mm(a.to(E5M2), b.to(E5M2), one, one, torch.float32)
    with pytest.raises(ValueError, match="multiples of 16"):
        scaled_mm(a[:24], b, one, one, torch.float32)
    # a bias only into a bfloat16 or float16 output, in that dtype
    bias = torch.randn(48)
    assert scaled_mm(a, b, one, one, torch.bfloat16, bias=bias.bfloat16()).shape == (32, 48)
    with pytest.raises(ValueError, match="bias with a torch.float32 output"):
        scaled_mm(a, b, one, one, torch.float32, bias=bias)
    with pytest.raises(ValueError, match="torch.float32 bias with a torch.bfloat16 output"):
        scaled_mm(a, b, one, one, torch.bfloat16, bias=bias)


def test_forward_and_gradients_are_the_float8_products():
    """Output, input gradient and weight gradient equal the float64 products of the dequantised
    operands (e4m3 inputs and weights, e5m2 output gradient), and are within float8's error of
    the true linear, but not equal to it (the float8 path really ran)."""
    x, w, b = _inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    out = float8_linear(x, w, b)
    grad = torch.randn_like(out)
    out.backward(grad)

    x2, g2 = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    want = (_deq(x2, E4M3) @ _deq(w.detach(), E4M3).T + b.detach().double()).reshape(out.shape)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
    want_dx = (_deq(g2, E5M2) @ _deq(w.detach(), E4M3)).reshape(x.shape)
    assert torch.allclose(x.grad.double(), want_dx, rtol=1e-5, atol=1e-5)
    want_dw = _deq(g2, E5M2).T @ _deq(x2, E4M3)
    assert torch.allclose(w.grad.double(), want_dw, rtol=1e-5, atol=1e-4)
    assert torch.allclose(b.grad, grad.sum((0, 1)))  # the bias stays out of float8

    exact = F.linear(x.detach().double(), w.detach().double(), b.detach().double())
    exact_dx = (g2.double() @ w.detach().double()).reshape(x.shape)
    exact_dw = g2.double().T @ x2.double()
    for ours, true in ((out, exact), (x.grad, exact_dx), (w.grad, exact_dw)):
        assert 1e-3 < _rel(ours, true) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_the_forward_gemm_accumulates_fast_and_adds_a_bias(monkeypatch, dtype):
    """torchao's tensorwise recipe: fast float8 accumulation in the forward GEMM, float32
    promotion in the two gradient GEMMs (the CPU ignores the flag, so the calls are recorded).
    A bfloat16 output takes the bias in the forward GEMM; a float32 one cannot (CUDA's rule)."""
    calls = []
    real = torch._scaled_mm

    def recording(a, b, **kwargs):
        bias = kwargs["bias"]
        calls.append((tuple(a.shape), tuple(b.shape), kwargs["use_fast_accum"], bias is not None))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    x, w, b = (t.to(dtype).requires_grad_(True) for t in _inputs())
    float8_linear(x, w, b).float().sum().backward()
    rows, (n, k) = x.numel() // x.shape[-1], w.shape
    fused = dtype == torch.bfloat16
    assert calls == [
        ((rows, k), (k, n), True, fused),  # out = x @ w.T (+ b)
        ((rows, n), (n, k), False, False),  # dx = g @ w
        ((n, rows), (rows, k), False, False),  # dw = g.T @ x
    ]
    assert b.grad.dtype == dtype and torch.equal(b.grad, torch.full_like(b, rows))


def test_a_bias_chunk_is_added_after_the_gemm(monkeypatch):
    """Split q/k/v hands each of q, k and v a chunk of the packed bias: views (at an offset,
    which torch 2.11's inductor cannot lower into `_scaled_mm`), added after the GEMM, where the
    whole bias joins it. The output is the bias add to bfloat16's rounding either way, and every
    chunk's gradient reaches the packed bias."""
    fused = []
    real = torch._scaled_mm

    def recording(a, b, **kwargs):
        if kwargs["use_fast_accum"]:  # the forward GEMM
            fused.append(kwargs["bias"] is not None)
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    x, w, b = _inputs(n=144)
    x = x.bfloat16()
    w, b = w.bfloat16().requires_grad_(True), b.bfloat16().requires_grad_(True)
    outs = [float8_linear(x, wi, bi) for wi, bi in zip(w.chunk(3), b.chunk(3), strict=True)]
    assert fused == [False, False, False]
    float8_linear(x, w, b)
    assert fused[-1]  # the whole bias: in the GEMM
    out = torch.cat(outs, -1)
    x2 = x.float().reshape(-1, x.shape[-1])
    want = (
        torch.cat([_deq(x2, E4M3) @ _deq(wi.detach().float(), E4M3).T for wi in w.chunk(3)], -1)
        + b.detach().double()
    )
    assert torch.allclose(out.double().reshape(want.shape), want, rtol=2**-7, atol=2**-7)
    out.float().sum().backward()
    assert torch.equal(b.grad, torch.full_like(b, x2.shape[0]))


def test_a_bias_in_the_gemm_gives_the_bias_add_and_its_gradient():
    """bfloat16 weights (the bf16-master step): the bias in the GEMM's epilogue equals the
    float64 product plus the bias to bfloat16's rounding; its gradient is the output
    gradient's sum over the rows."""
    x, w, b = (t.bfloat16().requires_grad_(True) for t in _inputs())
    out = float8_linear(x, w, b)
    grad = torch.randn_like(out)
    out.backward(grad)
    x2 = x.detach().float().reshape(-1, x.shape[-1])
    want = _deq(x2, E4M3) @ _deq(w.detach().float(), E4M3).T + b.detach().double()
    assert torch.allclose(out.double().reshape(want.shape), want, rtol=2**-7, atol=2**-7)
    want_db = grad.double().reshape(-1, grad.shape[-1]).sum(0)
    assert torch.allclose(b.grad.double(), want_db, rtol=2**-7, atol=1e-2)


def test_sizes_off_the_16_grid_run_as_ordinary_linears():
    x, w, b = _inputs(rows=62)  # 62 rows: not a multiple of 16
    assert torch.equal(float8_linear(x, w, b), F.linear(x, w, b))
    x, w, b = _inputs(k=40)
    assert torch.equal(float8_linear(x, w, b), F.linear(x, w, b))


def test_dtypes_follow_autocast_and_the_parameters():
    """Under bf16 autocast the output is bf16 (as F.linear's); the gradients come back in the
    input's and the weight's own dtypes (float32 master weights get float32 gradients)."""
    x, w, b = _inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = float8_linear(x, w, b)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    xb, wb = x.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    out = float8_linear(xb, wb)
    out.float().sum().backward()
    assert out.dtype == xb.grad.dtype == wb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("gelu,qkv", [("torch", "packed"), ("triton-bias", "split")])
def test_towers_with_float8_linears_keep_their_parameters(gelu, qkv):
    """model.linear=float8: the four linears of every block become Float8Linear holding the
    same parameters (same state dict both ways), and the tower computes nearly the same
    function (split q/k/v and fc1's bias in the GELU op go through float8 too)."""
    model = ModelConfig(embed_dim=64, depth=2, num_heads=4, gelu=gelu, qkv=qkv)
    data = DataConfig(num_mel_bins=32, target_length=64)
    torch.manual_seed(0)
    plain = build_audio_tower(model, data)
    torch.manual_seed(0)
    float8 = build_audio_tower(ModelConfig(**{**model.__dict__, "linear": "float8"}), data)
    linears = [m for m in float8.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 2 and all(isinstance(m, Float8Linear) for m in linears)
    assert plain.state_dict().keys() == float8.state_dict().keys()
    float8.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 64)
    ref, ours = plain(x), float8(x)
    assert 1e-4 < _rel(ours, ref) < 0.1
    ours.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in float8.parameters())


@pytest.mark.parametrize("gelu,qkv", [("torch", "packed"), ("triton-bias", "split")])
def test_float8_towers_trace_as_one_graph_with_the_eager_gradients(gelu, qkv):
    """What torch.compile does before inductor, on the CPU: dynamo traces a bf16 tower with
    float8 linears as one graph (fullgraph: a graph break would fail here; on the GPU it would
    split the step and stop inductor fusing the casts into their producers) and AOTAutograd's
    joint graph, run as it is (aot_eager), gives eager's gradients exactly. Inductor itself
    runs only in the `cuda` test (torch 2.9's CPU inductor crashes on these gradients)."""
    model = ModelConfig(embed_dim=64, depth=2, num_heads=4, gelu=gelu, qkv=qkv, linear="float8")
    torch.manual_seed(0)
    tower = build_audio_tower(model, DataConfig(num_mel_bins=32, target_length=64)).bfloat16()
    x = torch.randn(2, 3, 32, 64).bfloat16()
    torch._dynamo.reset()
    grads = []
    for net in (tower, torch.compile(tower, backend="aot_eager", fullgraph=True)):
        tower.zero_grad()
        net(x).float().square().mean().backward()
        grads.append([p.grad.clone() for p in tower.parameters()])
    torch._dynamo.reset()
    assert len(grads[1]) == len(list(tower.parameters())) > 0
    assert all(torch.equal(e, c) for e, c in zip(*grads, strict=True))


def test_only_plain_linears_are_taken_over():
    model = ModelConfig(embed_dim=64, depth=1, num_heads=4)
    tower = build_audio_tower(model, DataConfig(num_mel_bins=32, target_length=64))
    blocks = nn.ModuleList([tower.blocks[0]])
    use_float8_linears(blocks)
    with pytest.raises(TypeError, match="replace nn.Linear"):
        use_float8_linears(blocks)  # already Float8Linear: refused, not wrapped twice


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float8_on_cuda_equals_the_cpu_path():
    """The real float8 kernels: bf16 activations and weights as the bf16-master step has them,
    forward and both gradients against the same computation on the CPU, and under compile."""
    x, w, b = _inputs(rows=256, k=768, n=2304)
    outs = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device, torch.bfloat16).requires_grad_(True)
        wd = w.to(device, torch.bfloat16).requires_grad_(True)
        out = float8_linear(xd, wd, b.to(device, torch.bfloat16))
        out.float().square().sum().backward()
        outs[device] = [t.float().cpu() for t in (out, xd.grad, wd.grad)]
    for cpu, cuda in zip(outs["cpu"], outs["cuda"], strict=True):
        assert _rel(cuda, cpu) < 1e-2
    # compiled, with the weight a Parameter and its gradient (what crashed torch 2.9's CPU
    # compiler, so `compile_model` refuses float8 on a CPU)
    layer = Float8Linear.taking_over(nn.Linear(768, 2304).cuda().bfloat16())
    runs = []
    for net in (layer, torch.compile(layer)):
        xc = x.cuda().bfloat16().requires_grad_(True)
        layer.zero_grad()
        out = net(xc)
        out.float().square().sum().backward()
        runs.append([t.float().cpu() for t in (out, xc.grad, layer.weight.grad, layer.bias.grad)])
    for eager, compiled in zip(*runs, strict=True):
        assert _rel(compiled, eager) < 1e-2
    # split q/k/v's chunks of bf16 parameters, compiled: a bias chunk at an offset in the GEMM
    # failed torch 2.11's inductor (AssertionError lowering _scaled_mm) before it was kept out
    w2 = w.repeat(3, 1).cuda().bfloat16().requires_grad_(True)
    b2 = b.repeat(3).cuda().bfloat16().requires_grad_(True)

    def split(xs: torch.Tensor) -> torch.Tensor:
        pairs = zip(w2.chunk(3), b2.chunk(3), strict=True)
        return torch.cat([float8_linear(xs, wi, bi) for wi, bi in pairs], -1)

    xc = x.cuda().bfloat16()
    outs = [f(xc) for f in (split, torch.compile(split))]
    assert _rel(outs[1].float(), outs[0].float()) < 1e-2
    outs[1].float().square().sum().backward()
    assert w2.grad is not None and b2.grad is not None


def test_compiling_float8_linears_on_a_cpu_is_refused():
    from equiav.train.loop import compile_model

    layer = Float8Linear.taking_over(nn.Linear(64, 48))
    with pytest.raises(ValueError, match="model.linear=float8 is not compiled on a CPU"):
        compile_model(nn.Sequential(layer), "default")


def test_the_step_benchmark_runs_float8_linears_and_records_them(tmp_path, monkeypatch):
    """bench.step --linear float8 (smoke, CPU): the towers' GEMMs really go through float8
    (counted) and the row says what ran."""
    import kernels.float8 as K
    from bench import step
    from bench.common import read_result

    calls = []
    real = K.scaled_mm
    monkeypatch.setattr(K, "scaled_mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    path = step.run(
        modes=("pretrain",),
        linear="float8",
        device="cpu",
        smoke=True,
        steps=1,
        warmup=1,
        search=False,
        results_dir=tmp_path,
        log=lambda s: None,
    )
    (row,) = read_result(path)["rows"]
    assert row["status"] == "ok" and row["linear"] == "float8" and row["step_time_ms"] > 0
    assert len(calls) > 0  # forward and backward GEMMs of the towers' blocks
