"""Linear layers with float8 GEMMs (`model.linear: float8`): an opt-in speed lever, not the spec.

Hopper's tensor cores multiply float8 at twice their bfloat16 rate. Here each GEMM of a linear
layer (forward, input gradient, weight gradient) runs on float8 operands with one scale per
tensor, computed from the tensor's absolute maximum at every call ("tensorwise, dynamic"):
inputs and weights as e4m3 (3 mantissa bits, range 448), output gradients as e5m2 (2 bits, range
57344); products accumulate in float32 and come out in the activations' dtype (the weight
gradient in the weight's). This changes the numbers: each operand carries a relative rounding
error of up to 2^-4 (e4m3) or 2^-3 (e5m2), so a run with it is not the paper's; what it does to
EquiAV's curves has not been measured. Layers whose dimensions are not multiples of 16 (the GPU
kernel's rule) run as ordinary linears.

`torch._scaled_mm` on CUDA needs its first operand row-major and its second column-major, and
no e5m2 x e5m2 product; the CPU's accepts more. `scaled_mm` checks the CUDA rules on every
device, so the CPU tests catch a layout the GPU would refuse.

A bias joins the forward GEMM's epilogue where CUDA allows it (a bfloat16 or float16 output,
the bias in the same dtype): without it, the bias add is a pass of its own over the layer's
output wherever the next op is opaque to the compiler (fc1's output into our Triton GELU).

The forward GEMM accumulates with Hopper's fast float8 accumulation (``use_fast_accum``: partial
sums kept in the tensor cores' reduced precision instead of promoted to float32 as they go;
faster), the two gradient GEMMs without it: torchao's recipe for tensorwise float8 training,
whose gradients are the more sensitive to accumulated error. The CPU ignores the flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_ALIGN = 16  # every GEMM dimension of a float8 product on CUDA
_BIAS_OUT_DTYPES = (torch.bfloat16, torch.float16)  # outputs whose GEMM can add a bias on CUDA


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled so that its absolute maximum meets ``dtype``'s largest value, then rounded:
    -> (x8, inverse scale) with x ~= x8 * inverse scale. The scale stays on the device (no host
    sync); an all-zero tensor gets a finite scale, a non-finite one gives non-finite values (the
    step then skips itself, as for any overflow)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) (+ ``bias``) in ``out_dtype`` through `torch._scaled_mm`,
    after checking the operands against CUDA's rules (see the module docstring) on any device;
    ``fast_accum``: the GPU's fast float8 accumulation."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if not a.is_contiguous():
        raise ValueError("scaled_mm: the first operand must be row-major (contiguous)")
    if not b.t().is_contiguous():
        raise ValueError("scaled_mm: the second operand must be column-major (b.t() contiguous)")
    if a.dtype == E5M2 and b.dtype == E5M2:
        raise ValueError("scaled_mm: e5m2 x e5m2 has no CUDA kernel")
    if not float8_eligible(*a.shape, b.shape[1]):
        sizes = f"{tuple(a.shape)} x {b.shape[1]}"
        raise ValueError(f"scaled_mm: sizes {sizes} not positive multiples of 16")
    if bias is not None and not fusable_bias(bias, out_dtype):
        raise ValueError(f"scaled_mm: a {bias.dtype} bias with a {out_dtype} output has no kernel")
    return torch._scaled_mm(
        a,
        b,
        scale_a=scale_a,
        scale_b=scale_b,
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


def fusable_bias(bias: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether CUDA's float8 GEMM can add ``bias`` in its epilogue: a bfloat16 or float16
    output, the bias in that dtype (not a float32 output)."""
    return out_dtype in _BIAS_OUT_DTYPES and bias.dtype == out_dtype


def float8_eligible(x2d_rows: int, in_features: int, out_features: int) -> bool:
    """Whether a linear of these sizes can run its three GEMMs in float8: every size a
    positive multiple of 16 (the rows of x, its features, the outputs)."""
    return all(n > 0 and n % _ALIGN == 0 for n in (x2d_rows, in_features, out_features))


class _Float8MatMul(torch.autograd.Function):
    """x @ w.T (+ bias, in the GEMM's epilogue) with float8 operands in all three GEMMs; x (M,
    K), w (N, K), bias (N,) in ``out_dtype`` or None."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        x8, sx = to_float8(x, E4M3)
        w8, sw = to_float8(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)  # float8 copies: half the bytes of bf16 ones
        ctx.dtypes = (x.dtype, w.dtype)
        return scaled_mm(x8, w8.t(), sx, sw, out_dtype, fast_accum=True, bias=bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, sg = to_float8(grad.contiguous(), E5M2)
        # dx = g @ w: w (N, K) as a column-major operand; dw = g.T @ x: g.T row-major, x
        # column-major. The transposed copies are float8 (one byte a value).
        grad_x = scaled_mm(g8, w8.t().contiguous().t(), sg, sw, x_dtype)
        grad_w = scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), sg, sx, w_dtype)
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, None


def float8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` with float8 GEMMs where the sizes allow (else `F.linear` itself). The output
    dtype is autocast's when autocast is on for ``x``'s device, else ``x``'s."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if not float8_eligible(rows, in_features, out_features):
        return F.linear(x, weight, bias)
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    out_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    with torch.autocast(device, enabled=False):
        x2d = x.reshape(rows, in_features).contiguous()
        b = None if bias is None else bias.to(out_dtype)
        # A bias that is a view of another tensor stays out of the GEMM: split q/k/v gives q, k
        # and v each a chunk of the packed bias, and torch 2.11's inductor fails lowering
        # `_scaled_mm` with a chunk at an offset (an AssertionError, seen on an H200 on
        # 2026-11-27; eager CUDA takes it). Added after the GEMM, it fuses into the compiler's
        # next kernel. (`_base`, not `storage_offset()`: dynamo traces the first, not the second.)
        fused = b is not None and b._base is None and fusable_bias(b, out_dtype)
        out = _Float8MatMul.apply(x2d, weight, b if fused else None, out_dtype)
        out = out.reshape(*x.shape[:-1], out_features)
        return out if b is None or fused else out + b


class Float8Linear(nn.Linear):
    """`nn.Linear` (the same parameters and state dict) whose GEMMs run in float8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias)

    @classmethod
    def taking_over(cls, linear: nn.Linear) -> Float8Linear:
        """A Float8Linear holding ``linear``'s own parameters (the same tensors: nothing copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        return new


def linear_fn(module: nn.Module):
    """The linear function a layer computes with: `float8_linear` for a Float8Linear, else
    `F.linear` (for code that applies a layer's weight in pieces, e.g. split q/k/v)."""
    return float8_linear if isinstance(module, Float8Linear) else F.linear
