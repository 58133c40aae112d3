"""GELU, the exact (erf) form, as two Triton kernels for CUDA tensors: ``model.gelu: triton``.

Why: in the compiled bf16-master pretraining step on an H200, inductor's GELU kernels (forward,
backward) took 30 of 243 ms and moved their bytes at about half the memory's speed
(``bench/GPU-SESSIONS.md``). Compiled for sm_90, their erf (libdevice) makes them 44 and 56
instructions per element, as much issue- as memory-bound; these kernels take erfc from
Abramowitz & Stegun 7.1.26 on the GPU's fast ``ex2`` and division: 34 and 40. On an H200 they
made that step 2.5-2.6 % faster (batch 128 and 256).

``bias_gelu`` (``model.gelu: triton-bias``) is GELU(h + b) for fc1's output before its bias:
the bias add moves from the GEMM's epilogue into the forward kernel, and the backward kernel
sums the bias gradient over its tiles, which otherwise (an opaque GELU op) is a second pass
over the whole (tokens, hidden) gradient.

Numerics: float32 inside, whatever the tensor's dtype. A&S 7.1.26 gives erfc on [0, inf) to an
absolute error of 1.5e-7; with the fast exp2 and division (~2 ulp each) the forward is within
3e-7 x max(1, |x|) of the exact function, as close as ``torch.nn.functional.gelu`` in float32
(1.5e-7 here), and so is the backward, Phi(x) + x phi(x) with phi from the same exp2 (tests
against float64 from the denormals to 1e30). The error is absolute: in the far negative tail
(x < -5.5, GELU below 1e-7 in magnitude) the relative error grows to a few per cent at x = -12,
where torch's float32 GELU returns 0 (1 + erf cancels). bfloat16 and float16 outputs are the
float32 result rounded to nearest.

CPU tensors (and CUDA without triton, other dtypes, 2^31 elements or more) take torch's own
GELU (``F.gelu``, ``gelu_backward``):
the same function, so a model moves between machines unchanged. Under TRITON_INTERPRET=1 the
kernels run on CPU tensors (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton: torch's GELU everywhere
    triton = None

_BLOCK = 1024
_NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_path(x: torch.Tensor) -> bool:
    """Whether ``gelu`` runs the Triton kernels on x: triton importable, x on CUDA (or any
    device under TRITON_INTERPRET=1), a float32/bfloat16/float16 tensor of fewer than 2^31
    elements (the kernels index with int32, as inductor's do below that size)."""
    return (
        triton is not None
        and (x.is_cuda or triton_interpreting())
        and x.dtype in _DTYPES
        and x.numel() < 2**31
    )


if triton is not None:

    @triton.jit
    def _cdf_and_exp(x):
        """Phi(x) and exp(-x^2 / 2), float32."""
        z = tl.abs(x) * 0.7071067811865476  # |x| / sqrt(2)
        t = 1.0 / (1.0 + 0.3275911 * z)  # the GPU's fast division (div.full.f32)
        e = tl.exp2(x * x * -0.7213475204444817)  # exp(-x^2 / 2) = 2^(-x^2 / (2 ln 2))
        # A&S 7.1.26's coefficients a1..a5, by Horner's rule
        poly = -1.453152027 + t * 1.061405429
        poly = 0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * poly))
        poly = t * poly
        tail = 0.5 * poly * e  # erfc(|x| / sqrt(2)) / 2 = Phi(-|x|)
        return tl.where(x >= 0, 1.0 - tail, tail), e

    @triton.jit
    def _gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: numel < 2^31
        inside = offs < n
        x = tl.load(x_ptr + offs, inside).to(tl.float32)
        cdf, _ = _cdf_and_exp(x)
        tl.store(y_ptr + offs, (x * cdf).to(y_ptr.dtype.element_ty), inside)

    @triton.jit
    def _gelu_backward_kernel(g_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: numel < 2^31
        inside = offs < n
        x = tl.load(x_ptr + offs, inside).to(tl.float32)
        g = tl.load(g_ptr + offs, inside).to(tl.float32)
        cdf, e = _cdf_and_exp(x)
        dx = g * (cdf + x * e * 0.3989422804014327)  # Phi(x) + x phi(x); 1 / sqrt(2 pi)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), inside)

    @triton.jit
    def _bias_gelu_kernel(h_ptr, b_ptr, y_ptr, rows, cols, BM: tl.constexpr, BN: tl.constexpr):
        """y = GELU(h + b) on a (BM, BN) tile of the (rows, cols) matrix h."""
        r = tl.program_id(0) * BM + tl.arange(0, BM)
        c = tl.program_id(1) * BN + tl.arange(0, BN)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        offs = r[:, None] * cols + c[None, :]  # int32: rows x cols < 2^31
        b = tl.load(b_ptr + c, c < cols).to(tl.float32)
        x = tl.load(h_ptr + offs, inside).to(tl.float32) + b[None, :]
        cdf, _ = _cdf_and_exp(x)
        tl.store(y_ptr + offs, (x * cdf).to(y_ptr.dtype.element_ty), inside)

    @triton.jit
    def _bias_gelu_backward_kernel(
        g_ptr,
        h_ptr,
        b_ptr,
        dh_ptr,
        partial_ptr,
        rows,
        cols,
        BM: tl.constexpr,
        BN: tl.constexpr,
        TILES: tl.constexpr,
    ):
        """dh = g x GELU'(h + b) on TILES (BM, BN) tiles down the rows, and their column sums
        (float32, before rounding dh) into row `program_id(0)` of `partial`: the bias gradient,
        summed over programs afterwards (deterministic, unlike atomics)."""
        c = tl.program_id(1) * BN + tl.arange(0, BN)
        b = tl.load(b_ptr + c, c < cols).to(tl.float32)
        total = tl.zeros((BN,), tl.float32)
        for i in range(TILES):
            r = (tl.program_id(0) * TILES + i) * BM + tl.arange(0, BM)
            inside = (r[:, None] < rows) & (c[None, :] < cols)
            offs = r[:, None] * cols + c[None, :]
            x = tl.load(h_ptr + offs, inside).to(tl.float32) + b[None, :]
            g = tl.load(g_ptr + offs, inside).to(tl.float32)
            cdf, e = _cdf_and_exp(x)
            dx = tl.where(inside, g * (cdf + x * e * 0.3989422804014327), 0.0)
            tl.store(dh_ptr + offs, dx.to(dh_ptr.dtype.element_ty), inside)
            total += tl.sum(dx, axis=0)
        tl.store(partial_ptr + tl.program_id(0) * cols + c, total, c < cols)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, _BLOCK),)


@torch.library.custom_op("equiav::gelu", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x Phi(x), exact (erf) form; contiguous output. Differentiable (first order)."""
    x = x.contiguous()
    if not triton_path(x):
        return F.gelu(x)
    y = torch.empty_like(x)
    if x.numel():
        _gelu_kernel[_grid(x.numel())](x, y, x.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return y


@gelu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("equiav::gelu_backward", mutates_args=())
def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad x dGELU/dx at x; contiguous output."""
    grad, x = grad.contiguous(), x.contiguous()
    if not triton_path(x):
        return torch.ops.aten.gelu_backward(grad, x)
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(
            f"gelu_backward: grad {tuple(grad.shape)} {grad.dtype} does not match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    dx = torch.empty_like(x)
    if x.numel():
        _gelu_backward_kernel[_grid(x.numel())](
            grad, x, dx, x.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return dx


@gelu_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return gelu_backward(grad, x)


gelu.register_autograd(_backward, setup_context=_setup_context)


# bias_gelu's tiles: 32 x 128 elements (256 B of bfloat16 per row of a tile, coalesced along the
# hidden dimension); the backward walks 8 tiles down the rows per program, so its partial bias
# sums are 1/256 of the rows (3 MB for a batch-128 audio block's 65k x 3072).
_BM, _BN, _TILES = 32, 128, 8


def _bias_gelu_path(h: torch.Tensor, b: torch.Tensor) -> bool:
    """The Triton kernels for h and a bias that `_check_bias` has accepted."""
    return triton_path(h) and b.device == h.device and b.dtype in _DTYPES


def _check_bias(h: torch.Tensor, b: torch.Tensor) -> None:
    if b.dim() != 1 or h.dim() < 1 or h.shape[-1] != b.shape[0]:
        raise ValueError(
            f"bias_gelu: bias {tuple(b.shape)} does not match the last dimension of "
            f"{tuple(h.shape)}"
        )


@torch.library.custom_op("equiav::bias_gelu", mutates_args=())
def bias_gelu(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(h + b), b a bias along h's last dimension, in h's dtype (b may be float32 under
    autocast); contiguous output. Differentiable in h and b: the backward kernel also sums the
    bias gradient, which `F.linear(x, w, b)` followed by `gelu` leaves to a separate reduction
    over the whole (rows, hidden) gradient."""
    _check_bias(h, b)
    h, b = h.contiguous(), b.contiguous()
    if not _bias_gelu_path(h, b):
        return F.gelu(h + b.to(h.dtype))
    y = torch.empty_like(h)
    cols = h.shape[-1]
    rows = h.numel() // cols if cols else 0
    if h.numel():
        grid = (triton.cdiv(rows, _BM), triton.cdiv(cols, _BN))
        _bias_gelu_kernel[grid](h, b, y, rows, cols, BM=_BM, BN=_BN, num_warps=_NUM_WARPS)
    return y


@bias_gelu.register_fake
def _(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty(h.shape, dtype=h.dtype, device=h.device)


@torch.library.custom_op("equiav::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(
    grad: torch.Tensor, h: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x GELU'(h + b), its sum over all but the last dimension): the gradients of
    ``bias_gelu`` in h (h's dtype) and in b (b's dtype, summed in float32)."""
    _check_bias(h, b)
    grad, h, b = grad.contiguous(), h.contiguous(), b.contiguous()
    if grad.shape != h.shape or grad.dtype != h.dtype:
        raise ValueError(
            f"bias_gelu_backward: grad {tuple(grad.shape)} {grad.dtype} does not match h "
            f"{tuple(h.shape)} {h.dtype}"
        )
    if not _bias_gelu_path(h, b):
        dh = torch.ops.aten.gelu_backward(grad, h + b.to(h.dtype))
        db = dh.reshape(-1, b.shape[0]).sum(0, dtype=torch.float32).to(b.dtype)
        return dh, db
    dh = torch.empty_like(h)
    cols = h.shape[-1]
    rows = h.numel() // cols if cols else 0
    programs = triton.cdiv(rows, _BM * _TILES)
    partial = torch.empty(programs, cols, dtype=torch.float32, device=h.device)  # all written
    if h.numel():
        _bias_gelu_backward_kernel[(programs, triton.cdiv(cols, _BN))](
            grad, h, b, dh, partial, rows, cols, BM=_BM, BN=_BN, TILES=_TILES,
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    return dh, partial.sum(0).to(b.dtype)


@bias_gelu_backward.register_fake
def _(grad: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(h.shape, dtype=h.dtype, device=h.device),
        torch.empty(b.shape, dtype=b.dtype, device=b.device),
    )


def _bias_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _bias_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, b = ctx.saved_tensors
    return bias_gelu_backward(grad, h, b)


bias_gelu.register_autograd(_bias_backward, setup_context=_bias_setup_context)


class GELU(nn.Module):
    """``nn.GELU()`` (exact form) through ``gelu``: the Triton kernels on CUDA tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)
