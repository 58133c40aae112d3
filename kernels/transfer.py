"""Moving small host tensors to the training device without making the host wait for it.

A plain ``t.to("cuda")`` from ordinary (pageable) host memory is a blocking copy: PyTorch waits
for the current stream to finish everything queued before it, so the CPU stops running ahead of
the GPU. The augmentation parameters and masks are created on the host for every batch, right
after the training step has queued its kernels; each blocking copy there would make the input
pipeline wait for the step instead of overlapping with it. Going through page-locked memory makes
the copy asynchronous (PyTorch's pinned-memory allocator keeps the buffer alive until the copy
has run).
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU is copied asynchronously through pinned
    memory (see the module doc). Any other move is a plain ``.to``; no copy if already there."""
    device = torch.device(device)
    if t.device == device or (device.index is None and t.device.type == device.type):
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
