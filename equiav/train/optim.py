"""The optimiser side of a training step: AdamW with a "new layers" parameter group, the per-step
warmup-cosine learning-rate schedule, gradient-norm clipping, and the mixed-precision helpers
(autocast context, fp16 gradient scaler, fp32 master weights for bf16 parameters). Spec:
"Optimisation (paper defaults)".

Precisions (``train.precision``):

- ``bf16``: autocast to bfloat16; parameters, gradients and the residual stream stay float32.
- ``bf16-master``: the model itself is cast to bfloat16 (parameters, gradients, activations and
  the residual stream), under the same autocast (softmax, norms' statistics and the losses still
  run in float32), and the optimiser steps float32 copies of the trainable parameters
  (`MasterWeights`). Half the bytes of ``bf16`` in the step's memory-bound kernels (layer norms,
  GELU, residual adds: a third of a ViT-B step on an H100).
- ``fp16``: autocast to float16 with a GradScaler.
- ``fp32``: no autocast (TF32 matmuls on CUDA when ``train.tf32``).

Learning rates are set once per optimiser step by `LRSchedule.apply`: every parameter group
carries an `lr_scale` (1 for the pretrained body, `optim.head_lr` = 50 for the layers created for
finetuning) and gets `lr = schedule(step) * lr_scale`. The whole curve is scaled, warmup start and
final minimum included, so the new layers follow the same shape 50 times higher.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from equiav.config import OptimConfig, TrainConfig, field_choices

PRECISIONS: tuple[str, ...] = field_choices(TrainConfig, "precision")


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device: torch.device | str,
    new_parameters: Iterable[nn.Parameter] = (),
    master: MasterWeights | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the trainable (requires_grad) parameters of `model`.

    Two parameter groups: `new_parameters` (the finetuning heads; they must belong to `model`) at
    lr x `cfg.head_lr`, named "new" with `lr_scale` = head_lr, and every other trainable
    parameter at lr, named "body" with `lr_scale` = 1. Empty groups are left out. Weight decay
    applies to every parameter, biases and norms included, as in the original recipe. With
    `master` (precision "bf16-master") the optimiser holds the float32 master copies of those
    parameters instead of the model's bfloat16 ones.

    Implementation: NVIDIA apex `FusedAdam` (AdamW mode) when `cfg.use_apex` (CUDA only; apex is
    an optional extra, not on PyPI); else torch's fused AdamW on CUDA when `cfg.fused`; else
    torch's default (foreach where the device supports it).
    """
    device = torch.device(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    owned = {id(p) for p in model.parameters()}
    new_ids: set[int] = set()
    for p in new_parameters:
        if id(p) not in owned:
            raise ValueError(
                f"build_optimizer: a new parameter of shape {tuple(p.shape)} is not a parameter "
                "of the model"
            )
        new_ids.add(id(p))
    body = [p for p in trainable if id(p) not in new_ids]
    new = [p for p in trainable if id(p) in new_ids]  # frozen new parameters are skipped too

    if master is not None:
        body, new = [master.master_of(p) for p in body], [master.master_of(p) for p in new]
    groups: list[dict[str, Any]] = []
    if body:
        groups.append({"params": body, "name": "body", "lr_scale": 1.0, "lr": cfg.lr})
    if new:
        groups.append(
            {"params": new, "name": "new", "lr_scale": cfg.head_lr, "lr": cfg.lr * cfg.head_lr}
        )
    common = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)

    if cfg.use_apex:
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
        except ImportError as e:
            raise RuntimeError(
                "optim.use_apex=true, but NVIDIA apex is not installed (it is not on PyPI: build "
                "it from https://github.com/NVIDIA/apex), or set optim.use_apex=false to use "
                f"torch's fused AdamW ({e})"
            ) from None
        if device.type != "cuda":
            raise RuntimeError(f"optim.use_apex=true needs a CUDA device, got {device}")
        return FusedAdam(groups, adam_w_mode=True, **common)
    fused = cfg.fused and device.type == "cuda"
    return torch.optim.AdamW(groups, fused=True if fused else None, **common)


@dataclass
class LRSchedule:
    """Per-step learning rate: linear warmup from `warmup_start_lr` (step 0) to `base_lr` (step
    `warmup_steps`), then half a cosine from `base_lr` down to `min_lr` at `total_steps`, and
    `min_lr` after that. Steps count optimiser steps from 0."""

    base_lr: float
    warmup_start_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"LRSchedule: warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps < max(1, self.warmup_steps):
            raise ValueError(
                f"LRSchedule: total_steps ({self.total_steps}) must be >= 1 and >= warmup_steps "
                f"({self.warmup_steps})"
            )

    @classmethod
    def from_config(cls, cfg: OptimConfig, steps_per_epoch: int) -> LRSchedule:
        """The schedule of `cfg` for `steps_per_epoch` optimiser steps per epoch: warmup over
        round(steps_per_epoch * warmup_epochs) steps (warmup_epochs may be fractional), end at
        steps_per_epoch * max_epoch."""
        if steps_per_epoch < 1:
            raise ValueError(f"LRSchedule: steps_per_epoch must be >= 1, got {steps_per_epoch}")
        return cls(
            base_lr=cfg.lr,
            warmup_start_lr=cfg.warmup_start_lr,
            min_lr=cfg.min_lr,
            warmup_steps=round(steps_per_epoch * cfg.warmup_epochs),
            total_steps=steps_per_epoch * cfg.max_epoch,
        )

    def lr_at(self, step: int) -> float:
        """The unscaled learning rate for optimiser step `step`."""
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * frac
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each group's lr to lr_at(step) x its `lr_scale` (1 if absent); return lr_at(step)."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, float | int]:
        """The schedule's numbers (a resumed run continues the saved curve)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore the numbers saved by `state_dict` (unknown or missing keys are an error)."""
        expected = set(asdict(self))
        if set(state) != expected:
            raise ValueError(
                f"LRSchedule state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        restored = LRSchedule(**state)  # validates
        for key, value in asdict(restored).items():
            setattr(self, key, value)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the total L2 norm of the gradients of `params` to `max_norm` and return the norm
    before clipping, a 0-dim tensor on the gradients' device (read it only when logging: reading
    it waits for the device). `max_norm` 0 only measures. Uses the foreach kernels where the
    device supports them. With an fp16 GradScaler, call `scaler.unscale_(optimizer)` first; the
    norm may be inf/nan then (the scaler skips that step)."""
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm: max_norm must be >= 0, got {max_norm}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm == 0:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None)
    else:
        # foreach=None: foreach kernels where supported (CUDA), a loop elsewhere (foreach=True
        # raises on CPU tensors).
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
    return norm


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def make_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training (its gradients underflow without one); None for bf16 and
    fp32, whose exponent range needs no scaling."""
    _check_precision(precision)
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The forward-pass context for `precision`: autocast to bfloat16 / float16, or a context
    that does nothing for fp32."""
    _check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype)


class MasterWeights:
    """Float32 master weights for a model trained in bfloat16 (precision "bf16-master").

    Construction takes float32 copies of the model's trainable parameters and then casts the
    whole model (parameters and floating buffers) to bfloat16. Per step: the backward pass leaves
    bfloat16 gradients on the model; `grads_to_master` moves them to the copies as float32 (the
    optimiser and the gradient clipping work on the copies); after the optimiser step
    `copy_to_model` writes the copies' bfloat16 rounding back. Why the copies: an AdamW update
    moves a weight by about lr (1e-4), while bfloat16 resolves 2^-8 of a weight's size: for a
    weight of 0.02 that is the update's size, for a norm's gain of 1 forty times it, so updates
    applied to bfloat16 parameters would partly or wholly round away; in float32 they accumulate.

    Checkpoints stay float32 and precision-independent: `fp32_state` turns the model's state dict
    into the one a float32 model of the same weights would have. Load a checkpoint into the model
    *before* building this (the copies are taken from the model as it is then).
    """

    def __init__(self, model: nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("MasterWeights: the model has no parameter with requires_grad=True")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._grads: list[torch.Tensor] | None = None  # float32 gradient buffers, made once
        model.to(torch.bfloat16)  # in place: the Parameter objects stay, their data changes
        if any(p.dtype != torch.bfloat16 for p in self.params):
            raise RuntimeError("MasterWeights: casting the model replaced its parameter objects")

    def master_of(self, param: nn.Parameter) -> nn.Parameter:
        """The float32 copy of the model's trainable parameter `param`."""
        try:
            return self.master[self._index[id(param)]]
        except KeyError:
            raise ValueError(
                f"MasterWeights: a parameter of shape {tuple(param.shape)} is not one of the "
                "model's trainable parameters"
            ) from None

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Move the model's bfloat16 gradients to the copies as float32 (the model's are freed).
        A parameter without a gradient leaves its copy without one (AdamW skips it, as it would
        skip the parameter)."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            for g, m in zip(grads, self.master, strict=True):
                m.grad = None if g is None else g.float()
        else:  # one foreach copy into kept float32 buffers, not a cast per parameter
            if self._grads is None:
                self._grads = [torch.empty_like(m) for m in self.master]
            torch._foreach_copy_(self._grads, grads)
            for m, g in zip(self.master, self._grads, strict=True):
                m.grad = g
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write the copies into the model's parameters (rounded to bfloat16)."""
        torch._foreach_copy_(self.params, self.master)

    def fp32_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`model_state` (the bfloat16 model's ``state_dict()``) with the trainable parameters'
        float32 copies in place of their bfloat16 values and every other floating tensor cast to
        float32: what a float32 model of the same weights would save."""
        masters = dict(zip(self.names, self.master, strict=True))
        out = {}
        for key, value in model_state.items():
            if key in masters:
                out[key] = masters[key].detach().clone()
            elif value.is_floating_point():
                out[key] = value.float()
            else:
                out[key] = value
        return out


def master_weights(model: nn.Module, precision: str) -> MasterWeights | None:
    """`MasterWeights(model)` (which casts the model to bfloat16) for precision "bf16-master";
    None, and the model left as it is, for the others."""
    _check_precision(precision)
    return MasterWeights(model) if precision == "bf16-master" else None
