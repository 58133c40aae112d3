"""Small helpers over torch.distributed: process-group set-up from torchrun's environment and the
two all-gathers the contrastive losses need.

Everything works without a process group too (a plain `python train.py`): then there is one
process, rank 0 of 1, and both gathers return their input unchanged.

Gradient bookkeeping (why `all_gather_with_grad` sums and does not average): rank r computes
L_r, the loss of its own B rows scored against the whole global batch of W * B rows, so the
single-process loss on the concatenated batch is L = (1 / W) * sum_r L_r. Each rank's rows x_r
influence every L_r' (as keys of the other ranks' rows). The gather's backward all-reduces (sums)
the gradient of the gathered tensor over ranks and keeps this rank's slice; together with the
direct path through the local rows, rank r's parameters receive d(sum_r' L_r') / d x_r, the
gradient of W * L. DDP then averages the W ranks' gradients, i.e. divides by W, which gives
exactly dL / d(theta), the single-process gradient. Dividing by W inside the backward as well
would make the gradients W times too small; without DDP (a manual sum of gradients) one would
have to divide by W oneself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from equiav.config import TrainConfig, field_choices

_BACKENDS: tuple[str, ...] = field_choices(TrainConfig, "dist_backend")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on this
    node (which GPU it drives) and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"environment variable {name} is not set: launch multi-process runs with torchrun"
        )
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (and
    MASTER_ADDR / MASTER_PORT), or run as a single process when RANK / WORLD_SIZE are absent.

    backend "auto" is NCCL when CUDA is available and gloo otherwise. With CUDA, the process
    computes on cuda:LOCAL_RANK and makes it the current device (NCCL needs one GPU per process).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call init_distributed once")
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, and no CUDA device is available")

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)

    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"environment variable {name} is not set: launch with torchrun")
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                "visible: start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # device_id binds NCCL's communicator to our GPU (and lets barrier() know which GPU to use).
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        device_id=device if backend == "nccl" else None,
    )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 and in a single-process run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Leave the process group, if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks (see the module
    docstring for why summing is right under DDP)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world_size, rank = dist.get_world_size(), dist.get_rank()
        x = x.contiguous()
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # A private contiguous copy: all_reduce works in place, and autograd owns grad_out.
        grad = grad_out.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 (rank order), keeping the autograd graph.

    Every rank must pass a tensor of the same shape and dtype. Backward: the incoming gradient
    is summed over ranks (all_reduce) and this rank's slice flows back into `x`; under DDP's
    gradient averaging the result is the single-process gradient on the concatenated batch (the
    factor W of the sum cancels DDP's 1 / W: see the module docstring). Without a process group,
    returns `x` itself.
    """
    if not dist.is_initialized():
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """The original EquiAV code's gather: every rank's `x` concatenated along dim 0, with no
    gradient through any slice, this rank's own included (its `dist.all_gather` writes into fresh
    tensors that autograd does not track). As in the original, with one process (no group, or a
    group of size 1) `x` itself is returned, gradient and all.
    """
    if get_world_size() == 1:
        return x
    x = x.detach().contiguous()
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out
