"""What a run reports: scalars and text to TensorBoard plus a `metrics.jsonl` file, a progress bar
with an ETA, a step timer (throughput, data-wait fraction, GPU memory) and the software
environment. Everything that writes or prints does so on rank 0 only and is a no-op elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from equiav.train.dist import is_main

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> float:
    """A Python float from a number, 0-d tensor or NumPy scalar."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().item())
    return float(value)


class MetricsLogger:
    """Scalars and text for one run under `log_dir`: TensorBoard event files and one JSON line per
    `log` call in `metrics.jsonl` ({"step": ..., "time": ..., name: value, ...}; NaN and
    infinities are written as Python's json writes them).

    `enabled` defaults to "this is rank 0"; a disabled logger creates nothing. `purge_step`
    (resuming): TensorBoard hides the earlier run's events from that step on, and the lines of
    `metrics.jsonl` with step >= purge_step are dropped, so the curves do not double back.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        enabled: bool | None = None,
        purge_step: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = is_main() if enabled is None else enabled
        self._writer = None
        self._jsonl = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: slow, rank 0 only

        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / METRICS_FILE
        if purge_step is not None and path.is_file():
            _truncate_jsonl(path, purge_step)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._jsonl = open(path, "a", buffering=1)  # line-buffered: each line lands whole

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Record scalar `values` (numbers or 0-d tensors) at `step`."""
        if not self.enabled:
            return
        scalars = {name: _scalar(value) for name, value in values.items()}
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Record a block of text (a config dump, the environment) under `tag`."""
        if not self.enabled:
            return
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Push buffered events to disk."""
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.enabled = False

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_jsonl(path: Path, purge_step: int) -> None:
    """Drop the lines of `path` with step >= purge_step (and any unreadable tail line)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and record.get("step", math.inf) < purge_step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class ProgressBar:
    """A tqdm bar with rate and ETA on rank 0; does nothing elsewhere or when `enabled` is False."""

    def __init__(self, total: int | None, desc: str = "", enabled: bool | None = None) -> None:
        self.enabled = is_main() if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n`; keyword arguments are shown after the bar (floats get 4 digits)."""
        if self._bar is None:
            return
        if postfix:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepTimer:
    """Where the step time goes: waiting for data versus everything else.

    Per step, call `wait_start()` before asking the loader for a batch, `wait_end()` when it
    arrives, and `step_end(samples)` after the optimiser step. A step's time runs from the
    previous `step_end` (for the first step: its `wait_start`) to this one. `report()` sums the
    last `window` steps. CUDA work is asynchronous: the CPU clock sees GPU time only where
    something waits for the GPU (a `.item()`, a full launch queue), so read the numbers over a
    window rather than per step. `clock` is injectable for tests.
    """

    def __init__(
        self,
        window: int = 50,
        clock: Callable[[], float] = time.perf_counter,
        device: torch.device | str | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"StepTimer: window must be >= 1, got {window}")
        self.clock = clock
        self.device = torch.device(device) if device is not None else None
        self._steps: deque[tuple[float, float, int]] = deque(maxlen=window)  # (step, wait, n)
        self._last_end: float | None = None
        self._wait_start: float | None = None
        self._wait = 0.0

    def wait_start(self) -> None:
        """The loop starts waiting for the next batch."""
        self._wait_start = self.clock()
        if self._last_end is None:
            self._last_end = self._wait_start

    def wait_end(self) -> None:
        """The batch has arrived."""
        if self._wait_start is None:
            raise RuntimeError("StepTimer.wait_end called without wait_start")
        self._wait += self.clock() - self._wait_start
        self._wait_start = None

    def step_end(self, samples: int) -> None:
        """The step that consumed `samples` samples (this process's batch) is done."""
        now = self.clock()
        if self._last_end is None:
            raise RuntimeError("StepTimer.step_end called before the first wait_start")
        self._steps.append((now - self._last_end, self._wait, samples))
        self._last_end = now
        self._wait = 0.0

    def report(self) -> dict[str, float]:
        """Over the window: `samples_per_s` (this process), `data_wait_frac` (share of the time
        spent waiting for data), `step_ms` (mean step time) and, on CUDA, `gpu_mem_gib` (peak
        memory allocated by tensors so far). Empty before the first step."""
        if not self._steps:
            return {}
        total = sum(s for s, _, _ in self._steps)
        wait = sum(w for _, w, _ in self._steps)
        samples = sum(n for _, _, n in self._steps)
        out = {
            "samples_per_s": samples / total if total > 0 else math.inf,
            "data_wait_frac": wait / total if total > 0 else 0.0,
            "step_ms": 1000.0 * total / len(self._steps),
        }
        device = self.device
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out


def _version(module: str) -> str | None:
    """A module's `__version__`, or None when it is not installed."""
    try:
        return getattr(__import__(module, fromlist=["__version__"]), "__version__", "unknown")
    except Exception:  # not installed, or failing to import (e.g. DALI without its libraries)
        return None


def environment_info() -> dict[str, Any]:
    """The software and hardware a run used, to save beside it: Python, torch (and its CUDA and
    cuDNN), DALI, timm, NumPy versions, the CUDA devices by name, hostname and platform."""
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": _version("nvidia.dali"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
    }
