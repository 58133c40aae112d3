"""One optimiser step (backward, gradient clipping, AdamW) that never makes the host wait for the
device, and the host-side bookkeeping of the steps it had to skip.

Why: the input pipeline's device stage (the filterbank and the augmentations of the next batch)
is launched from the same Python thread as the training step. It overlaps the step only if that
thread can run ahead of the GPU; every host read of a device value (``.item()``, ``bool(t)``,
``float(t)``, a blocking copy) drains the GPU's queue first, and the GPU then idles while the
host prepares the next batch (measured on an H100: end to end at 63 % of the step alone).

The step's one decision that needs a device value is "is the loss finite?". torch's fused
Adam/AdamW take that answer as a device tensor (``found_inf``, the mechanism its GradScaler uses)
and skip the update inside the kernel, moments and step count included; so with them the answer
stays on the device, and the host learns it later (``SkippedSteps``), for counting and logging
only. Other optimisers (unfused, apex) and fp16 with a GradScaler read the answer on the host
before the backward pass, as a plain loop does. A skipped step counts as a step either way (the
learning-rate schedule moves on), as fp16 steps skipped by a GradScaler do in most trainers.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from equiav.config import TrainConfig, field_choices
from equiav.train.optim import MasterWeights, clip_grad_norm

log = logging.getLogger(__name__)


class StopTraining(RuntimeError):
    """The run cannot go on (too many non-finite losses in a row); the message says why."""


def skips_on_device(optimizer: torch.optim.Optimizer, scaler: object | None) -> bool:
    """Whether ``optimizer_step`` can skip a non-finite step without a host read: torch's fused
    Adam/AdamW, no fp16 GradScaler (which sets ``found_inf`` itself)."""
    fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
    return fused and bool(optimizer.defaults.get("fused")) and scaler is None


STEP_STREAMS: tuple[str, ...] = field_choices(TrainConfig, "step_stream")


@contextlib.contextmanager
def step_stream(setting: str, device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """Run the block's CUDA work on the stream ``train.step_stream`` names: "default" (torch's
    current stream: nothing changes) or "high-priority" (a new stream of the device's highest
    priority); yields the stream, or None where nothing changes (any setting on a CPU).

    Why: on a GPU the loader's kernels (DALI's, the device stage's) run on their own streams of
    the default, lowest priority, beside the step. Stream priority is a hint to the block
    scheduler (it does not preempt running blocks): pending blocks of the step go first, the
    loader's fill what the step leaves idle. The new stream first waits for the current one (the
    model's weights were copied to the device there), and the current one waits for it on the
    way out, so that work before and after the block sees the step's results."""
    if setting not in STEP_STREAMS:
        raise ValueError(f"train.step_stream must be one of {STEP_STREAMS}, got {setting!r}")
    if setting == "default" or device.type != "cuda":
        yield None
        return
    outer = torch.cuda.current_stream(device)
    _, highest = torch.cuda.Stream.priority_range()
    stream = torch.cuda.Stream(device, priority=highest)
    stream.wait_stream(outer)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        outer.wait_stream(stream)


def _all_ranks_max(flag: torch.Tensor) -> torch.Tensor:
    """The flag's maximum over all ranks (asynchronous on NCCL: nothing waits here)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


@dataclass
class StepOutcome:
    """What a step leaves on the device, read by the host only when it logs."""

    loss: torch.Tensor  # detached
    grad_norm: torch.Tensor  # 0-dim float32: the norm before clipping (0 if skipped on the host)
    nonfinite: torch.Tensor  # 0-dim float32, 1.0 when the update was skipped (every rank agrees)


def optimizer_step(
    loss: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
    master: MasterWeights | None = None,
) -> StepOutcome:
    """zero_grad, backward, clip ``params``' gradients to ``grad_clip`` (0: measure only) and
    step, unless the loss is non-finite on any rank: then the parameters and the optimiser state
    stay as they were. See the module doc for when this waits for the device (never with fused
    AdamW in bf16/fp32). With a fused optimiser a non-finite gradient norm skips the update too.
    With ``master`` (precision "bf16-master") the gradients move to the float32 master weights
    after the backward pass, the clipping and the update work on those (``params`` is not used),
    and the model gets the updated weights back.
    """
    bad = _all_ranks_max((~torch.isfinite(loss.detach())).float())
    optimizer.zero_grad(set_to_none=True)
    on_device = skips_on_device(optimizer, scaler)
    if not on_device and bool(bad):  # a host read: every rank skips together (bad is agreed)
        zero = torch.zeros((), device=bad.device)
        return StepOutcome(loss.detach(), zero, bad)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if master is not None:
        master.grads_to_master()
        params = master.master
    norm = clip_grad_norm(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif on_device:
        bad = torch.maximum(bad, (~torch.isfinite(norm)).float())
        optimizer.found_inf = bad  # read by the fused kernel: skip the update when 1
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    else:
        optimizer.step()
    if master is not None:
        master.copy_to_model()  # a skipped update leaves the copies, hence the model, as they were
    return StepOutcome(loss.detach(), norm.detach().float(), bad)


class SkippedSteps:
    """The host's record of skipped steps, from the flags ``optimizer_step`` left on the device.

    ``add`` copies a step's flag to pinned host memory asynchronously; ``poll`` reads the flags
    that have arrived, in step order (``wait=True``: all of them, waiting for the device), logs
    each skipped step, and raises ``StopTraining`` once ``max_in_row`` steps in a row were
    skipped. Call ``poll()`` every step (it never waits) and ``poll(wait=True)`` where the loop
    synchronises anyway (logging, checkpoints, the end).
    """

    def __init__(self, max_in_row: int) -> None:
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be >= 1, got {max_in_row}")
        self.max_in_row = max_in_row
        self.total = 0
        self.in_row = 0
        self.last_skipped = False  # whether the last step read was skipped
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def add(self, step: int, flag: torch.Tensor) -> None:
        """Record step ``step``'s flag (a 0-dim device tensor, 1 = skipped)."""
        if flag.is_cuda:
            host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, flag.detach().clone(), None))

    def poll(self, wait: bool = False) -> None:
        """Read every flag that has arrived (all of them with ``wait``), oldest first."""
        while self._pending:
            step, host, event = self._pending[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._pending.popleft()
            self.last_skipped = bool(host > 0.5)
            if not self.last_skipped:
                self.in_row = 0
                continue
            self.total += 1
            self.in_row += 1
            log.warning(
                "step %d: non-finite loss or gradients, update skipped (%d in a row, %d total)",
                step,
                self.in_row,
                self.total,
            )
            if self.in_row >= self.max_in_row:
                raise StopTraining(
                    f"{self.in_row} non-finite losses in a row at step {step}: stopping (lower "
                    "optim.lr, check the data, or raise train.max_nonfinite_in_row)"
                )
