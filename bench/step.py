"""The training step alone: samples/s, step time, peak memory and MFU, without data loading.

The model, loss, optimizer and step are the trainer's own (`train.py`'s tasks,
`equiav.train.optim`), and one step does what `equiav.train.loop` does per batch: autocast
forward and loss, the non-finite check, backward (fp16: through a GradScaler), gradient-norm
clipping and the AdamW step. The batch is synthetic (random tensors of the loader's shapes made
once, already on the device), so only the step is timed.

Measured per configuration (mode x precision x fused/unfused AdamW x eager/`torch.compile`):

- at the paper's per-GPU batch (pretrain 16, finetune 32), and on CUDA also at the largest batch
  that fits, found by doubling from the paper's batch until the device runs out of memory;
- step time (mean, median, min over the timed steps after the warm-up steps), samples/s, peak
  allocated and reserved memory (CUDA), achieved TFLOP/s from `bench.flops` (3 x forward matmul
  FLOPs) and MFU = achieved / the device's dense bf16 peak (`PEAK_BF16_TFLOPS`; the same peak for
  every precision, so MFU says how much of the machine a configuration uses; null on the CPU and
  on GPUs not in the table).

On the CPU the benchmark runs in smoke mode (always): a tiny model (`SMOKE_MODEL`, `SMOKE_DATA`),
small batches and a few steps, to check the machinery, not to measure. `--smoke` asks for it on a
GPU too.

Command line (default: one configuration, bf16 + fused AdamW + eager, both modes)::

    python -m bench.step                 # -> bench/results/step-{host}.json
    python -m bench.step --grid          # all 16 configurations -> step-grid-{host}.json
    python -m bench.step --grid eager    # the 8 eager ones
    python -m bench.step --mode pretrain --precision fp16 --unfused --compile --no-search
    python -m bench.step --mode pretrain --precision bf16 bf16-master --compile --batch-size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import add_model_arguments, write_result
from bench.flops import FlopCount, finetune_flops, pretrain_flops
from equiav.config import COMPILE_MODES, Config, default_config
from equiav.train.loop import compile_model
from equiav.train.optim import PRECISIONS, autocast, build_optimizer, make_scaler, master_weights
from equiav.train.step import optimizer_step
from train import finetune_task, pretrain_task

MODES = ("pretrain", "finetune")
# Attention kernels `--sdpa` can force (torch picks cuDNN's on an H100 by default).
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
PAPER_BATCH = {"pretrain": 16, "finetune": 32}  # per GPU, as in the paper
SMOKE_BATCH = {"pretrain": 4, "finetune": 8}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. Matched in
# order: every listed substring must occur in `torch.cuda.get_device_name()`. The H100 SXM
# reports itself as "NVIDIA H100 80GB HBM3". A GPU not listed gets no peak and no MFU. The NVL
# (PCIe) cards first: "NVIDIA H200 NVL" would match the SXM part's rule.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "NVL"), 835.0),
    (("H100", "NVL"), 835.0),
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "HBM3"), 989.0),
    (("H100", "SXM"), 989.0),
    (("A100",), 312.0),
)

# The smoke-mode model: every part of the real one, tiny.
SMOKE_MODEL = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "aug_hidden": 32,
    "head_hidden": 128,
    "head_out": 64,
    "predictor_heads": 2,
    "predictor_head_dim": 16,
    "cen_num": 4,
    "ft_proj_dim": 32,
}
SMOKE_DATA = {"num_mel_bins": 64, "target_length": 256, "image_size": 64, "n_classes": 10}


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU named `device_name`, or None (CPU, unknown GPU)."""
    if not device_name:
        return None
    for needles, peak in PEAK_BF16_TFLOPS:
        if all(n in device_name for n in needles):
            return peak
    return None


@contextmanager
def forced_attention(sdpa: str) -> Iterator[None]:
    """Run under `sdpa`'s attention kernel ("default": torch's own choice).

    A forced kernel also turns AOTAutograd's compile cache off: its key leaves out the SDPA
    backend flags (torch 2.9.1 on the CPU; 2.11 on the H200 by its results), so a step compiled
    after another setting's step, in this process or an earlier one, silently runs the first
    setting's kernel: the `step-sdpa` rows of the fifth GPU session (GPU-SESSIONS.md) measured
    cuDNN's kernel three times (tests/test_bench.py shows it with the CPU's flash and math
    kernels).
    """
    if sdpa == "default":
        yield
        return
    with (
        sdpa_kernel(SDPA_BACKENDS[sdpa]),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


@dataclass(frozen=True)
class StepSetup:
    """One configuration of the training step."""

    mode: str  # "pretrain" or "finetune"
    precision: str  # one of equiav.train.optim.PRECISIONS
    fused: bool  # fused AdamW (CUDA) or torch's default implementation
    compile: bool  # torch.compile the model
    compile_mode: str = "default"  # torch.compile's mode (train.compile_mode)
    sdpa: str = "default"  # attention kernel: torch's choice, or one of SDPA_BACKENDS
    gelu: str = "torch"  # the towers' GELU: model.gelu
    qkv: str = "packed"  # the towers' q, k, v projections: model.qkv
    linear: str = "default"  # the towers' linear layers' GEMMs: model.linear

    @classmethod
    def of(cls, mode: str, cfg: Config) -> StepSetup:
        """The setup that `cfg` describes (its precision, optimizer, compilation, GELU, q, k, v
        projections and linear layers)."""
        t, m = cfg.train, cfg.model
        return cls(
            mode,
            t.precision,
            cfg.optim.fused,
            t.compile,
            t.compile_mode,
            gelu=m.gelu,
            qkv=m.qkv,
            linear=m.linear,
        )


def run_config(setup: StepSetup, smoke: bool) -> Config:
    """The trainer's configuration for `setup` (paper defaults; the tiny model in smoke mode)."""
    cfg = default_config(setup.mode)
    model = dataclasses.replace(
        cfg.model,
        **(SMOKE_MODEL if smoke else {}),
        gelu=setup.gelu,
        qkv=setup.qkv,
        linear=setup.linear,
    )
    data = dataclasses.replace(cfg.data, **(SMOKE_DATA if smoke else {}))
    optim = dataclasses.replace(cfg.optim, fused=setup.fused)
    train = dataclasses.replace(
        cfg.train,
        precision=setup.precision,
        compile=setup.compile,
        compile_mode=setup.compile_mode,
    )
    return dataclasses.replace(cfg, model=model, data=data, optim=optim, train=train)


def synthetic_batch(
    mode: str, cfg: Config, batch: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors with the shapes and dtypes the loader delivers for `mode`, on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, m = cfg.data, cfg.model

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    audio_shape = (batch, 3, d.num_mel_bins, d.target_length)
    visual_shape = (batch, 3, d.image_size, d.image_size)
    out = {
        "audio": randn(*audio_shape),
        "visual": randn(*visual_shape),
        "index": torch.arange(batch, device=device),
    }
    if mode == "finetune":
        n = d.resolved_n_classes()
        out["labels"] = (torch.rand(batch, n, generator=g, device=device) < 0.05).float()
        return out
    out.update(
        audio_aug=randn(*audio_shape),
        visual_aug=randn(*visual_shape),
        t_a=randn(batch, m.aug_size_a),
        t_v=randn(batch, m.aug_size_v),
    )
    if m.cen_mean:
        out["t_a_cen"] = randn(batch, m.cen_num, m.aug_size_a)
        out["t_v_cen"] = randn(batch, m.cen_num, m.aug_size_v)
    return out


def step_flops(mode: str, cfg: Config, batch: int) -> FlopCount:
    """Matmul FLOPs of one step of `mode` at `batch` (bench.flops)."""
    if mode == "pretrain":
        return pretrain_flops(cfg.model, cfg.data, batch)
    return finetune_flops(cfg.model, cfg.data, batch, cfg.data.resolved_n_classes())


def _is_oom(error: BaseException) -> bool:
    # torch.compile'd code may re-raise an allocation failure as a plain RuntimeError.
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def check_setup(setup: StepSetup, cfg: Config) -> None:
    """Raise ValueError where `setup` and `cfg` disagree: the model and optimizer come from
    `cfg`, the step's precision and compilation from `setup`, so a benchmark whose two disagree
    would measure one thing and record another."""
    pairs = {
        "precision": (setup.precision, cfg.train.precision),
        "fused": (setup.fused, cfg.optim.fused),
        "compile": (setup.compile, cfg.train.compile),
        "gelu": (setup.gelu, cfg.model.gelu),
        "qkv": (setup.qkv, cfg.model.qkv),
        "linear": (setup.linear, cfg.model.linear),
    }
    if setup.compile:
        pairs["compile_mode"] = (setup.compile_mode, cfg.train.compile_mode)
    wrong = [
        f"{k}: {a!r} in the setup, {b!r} in the config" for k, (a, b) in pairs.items() if a != b
    ]
    if wrong:
        raise ValueError("the step's setup and its config disagree: " + "; ".join(wrong))


class TrainStep:
    """The trainer's step for one configuration: model, optimizer and scaler built once."""

    def __init__(self, setup: StepSetup, cfg: Config, device: torch.device) -> None:
        check_setup(setup, cfg)
        self.setup, self.cfg, self.device = setup, cfg, device
        torch.manual_seed(0)
        build = pretrain_task if setup.mode == "pretrain" else finetune_task
        self.task = build(cfg, load_weights=False)
        self.model = self.task.model.to(device)
        self.master = master_weights(self.model, setup.precision)
        self.optimizer = build_optimizer(
            self.model, cfg.optim, device, self.task.new_parameters, self.master
        )
        self.scaler = make_scaler(setup.precision, device)
        self.net = self.model
        if setup.compile:
            self.net = compile_model(self.model, setup.compile_mode)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.skipped = 0  # optimizer steps the fp16 scaler skipped (inf/nan gradients)
        self.last = None  # the last step's StepOutcome (device tensors)

    @property
    def optimizer_impl(self) -> str:
        """Which AdamW implementation runs: "fused", "foreach" or "for-loop"."""
        if self.optimizer.defaults.get("fused"):
            return "fused"
        foreach = self.optimizer.defaults.get("foreach")
        # foreach=None means "foreach where supported": CUDA tensors.
        if foreach or (foreach is None and self.device.type == "cuda"):
            return "foreach"
        return "for-loop"

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        """One training step on `batch`, as `equiav.train.loop.train` runs it (the same
        `optimizer_step`: with fused AdamW in bf16/fp32 the host never waits for the device)."""
        with autocast(self.setup.precision, self.device), forced_attention(self.setup.sdpa):
            loss, _ = self.task.loss(self.net, batch)
        scale = self.scaler.get_scale() if self.scaler is not None else None
        self.last = optimizer_step(
            loss, self.params, self.optimizer, self.scaler, self.cfg.optim.grad_clip, self.master
        )
        if self.scaler is not None:
            self.skipped += int(self.scaler.get_scale() < scale)  # it lowers the scale on a skip

    def reset_after_oom(self) -> None:
        """Drop gradients and cached blocks after an out-of-memory error; a fresh scaler (the old
        one may have been left between unscale_ and update)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)  # bf16-master: the model's own gradients
        self.scaler = make_scaler(self.setup.precision, self.device)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fits(step: TrainStep, batch_size: int, trials: int = 2) -> bool:
    """Whether `trials` steps at `batch_size` run without running out of device memory."""
    oom = False
    try:
        batch = synthetic_batch(step.setup.mode, step.cfg, batch_size, step.device)
        for _ in range(trials):
            step(batch)
        _sync(step.device)
    except Exception as e:
        if not _is_oom(e):
            raise
        oom = True
    batch = None  # noqa: F841 (free the batch before emptying the cache)
    if oom:
        step.reset_after_oom()  # outside the except block: the traceback no longer pins memory
    return not oom


def find_max_batch(fits_at: Callable[[int], bool], start: int, limit: int) -> int | None:
    """The largest of start, 2 * start, 4 * start, ... (at most `limit`) for which `fits_at` is
    true, trying them in order and stopping at the first that is not; None if `start` does not
    fit."""
    best, size = None, start
    while size <= limit and fits_at(size):
        best, size = size, size * 2
    return best


def measure(step: TrainStep, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """Time `steps` steps at `batch_size` after `warmup` untimed ones; -> a result row."""
    device, setup = step.device, step.setup
    batch = synthetic_batch(setup.mode, step.cfg, batch_size, device)
    first_step_s = None
    first_start = time.perf_counter()
    for i in range(warmup):
        step(batch)
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - first_start
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    step.skipped = 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    if step.last is not None and float(step.last.nonfinite) > 0:
        raise FloatingPointError(f"{setup}: non-finite loss on synthetic data")
    mean_s = sum(times) / len(times)
    flops = step_flops(setup.mode, step.cfg, batch_size)
    achieved = flops.train_total / mean_s / 1e12
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_bf16_tflops(device_name)
    gib = 2.0**30
    cuda = device.type == "cuda"
    return {
        "mode": setup.mode,
        "precision": setup.precision,
        "optimizer": "fused" if setup.fused else "unfused",
        "optimizer_impl": step.optimizer_impl,
        "compile": setup.compile,
        "compile_mode": setup.compile_mode if setup.compile else None,
        "sdpa": setup.sdpa,
        "gelu": setup.gelu,
        "qkv": setup.qkv,
        "linear": setup.linear,
        "batch_size": batch_size,
        "status": "ok",
        "steps": steps,
        "warmup_steps": warmup,
        "first_step_s": first_step_s,  # includes compilation with torch.compile
        "step_time_ms": 1e3 * mean_s,
        "step_time_ms_median": 1e3 * statistics.median(times),
        "step_time_ms_min": 1e3 * min(times),
        "samples_per_s": batch_size / mean_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / gib if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib if cuda else None,
        "flops_per_sample": flops.train_per_sample,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "fp16_skipped_steps": step.skipped if setup.precision == "fp16" else None,
    }


def _failed_row(setup: StepSetup, batch_size: int | None, kind: str, status: str, error: str):
    return {
        "mode": setup.mode,
        "precision": setup.precision,
        "optimizer": "fused" if setup.fused else "unfused",
        "compile": setup.compile,
        "batch_size": batch_size,
        "batch_kind": kind,
        "status": status,
        "error": error,
    }


def _measure_row(step: TrainStep, size: int, kind: str, steps: int, warmup: int) -> dict:
    """`measure` as a row with its `batch_kind`; a failure becomes a row with a status."""
    oom, error = False, None
    try:
        row = measure(step, size, steps, warmup)
    except Exception as e:  # one failed configuration must not end the grid
        oom = _is_oom(e)
        error = None if oom else f"{type(e).__name__}: {e}"
    if oom:
        step.reset_after_oom()  # outside the except block: the traceback no longer pins memory
        return _failed_row(step.setup, size, kind, "oom", "out of memory")
    if error is not None:
        return _failed_row(step.setup, size, kind, "error", error)
    return {**row, "batch_kind": kind}


def _setup_rows(
    step: TrainStep, base: int, kind: str, steps: int, warmup: int, search: bool, limit: int
) -> list[dict[str, Any]]:
    rows = [_measure_row(step, base, kind, steps, warmup)]
    if not search or rows[0]["status"] == "error":
        return rows
    try:
        largest = find_max_batch(lambda b: fits(step, b), base, limit)
    except Exception as e:
        return rows + [_failed_row(step.setup, None, "max", "error", f"{type(e).__name__}: {e}")]
    if largest is None:
        return rows + [_failed_row(step.setup, None, "max", "oom", f"batch {base} does not fit")]
    row = _measure_row(step, largest, "max", steps, warmup)
    # The search doubles up to the limit: a larger batch may fit where the next size was above
    # it (never tried), unlike where it ran out of memory.
    return rows + [{**row, "batch_limit_reached": 2 * largest > limit}]


def benchmark_setup(
    setup: StepSetup,
    device: torch.device,
    smoke: bool,
    steps: int,
    warmup: int,
    search: bool,
    batch_limit: int,
    batch_sizes: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Rows for one configuration: at the paper's (smoke: the small) batch, and on CUDA with
    `search` at the largest batch that fits; or, with `batch_sizes`, at each of those batches
    (kind "fixed"), each on a freshly built step, so that a compiled step is compiled for that
    batch alone (static shapes, as in training; the search's later sizes run the graph torch
    recompiled for dynamic shapes). Failures become rows with a status, not errors."""
    cfg = run_config(setup, smoke)
    if batch_sizes:
        jobs = [(size, "fixed", False) for size in batch_sizes]
    else:
        kind = "smoke" if smoke else "paper"
        jobs = [((SMOKE_BATCH if smoke else PAPER_BATCH)[setup.mode], kind, search)]
    rows = []
    for size, kind, search_here in jobs:
        if setup.compile:
            # Dynamo remembers the sizes a function's code has seen, across compiled models
            # (and reuses a graph whose guards pass): forget them, or a second batch size, or
            # the next configuration of a grid after another's batch search, would run a graph
            # compiled for dynamic shapes (or none compiled in its first step).
            torch._dynamo.reset()
        try:
            step = TrainStep(setup, cfg, device)
        except Exception as e:  # e.g. a precision the device lacks: record it, go on
            rows.append(_failed_row(setup, size, kind, "error", f"{type(e).__name__}: {e}"))
            continue
        try:
            rows += _setup_rows(step, size, kind, steps, warmup, search_here, batch_limit)
        finally:
            del step  # free this configuration's model and optimizer before the next one's
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def setups(
    modes: Sequence[str],
    precisions: Sequence[str],
    fused: Sequence[bool],
    compiled: Sequence[bool],
    compile_mode: str = "default",
    sdpa: str = "default",
    gelu: str = "torch",
    qkv: str = "packed",
    linear: str = "default",
) -> list[StepSetup]:
    """Every combination, mode outermost."""
    combos = itertools.product(modes, precisions, fused, compiled)
    extra = {"compile_mode": compile_mode, "sdpa": sdpa, "gelu": gelu, "qkv": qkv, "linear": linear}
    return [StepSetup(*c, **extra) for c in combos]


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for row in rows:
        if row["status"] == "ok":
            current = best.get(row["mode"])
            if current is None or row["samples_per_s"] > current["samples_per_s"]:
                best[row["mode"]] = row
    keys = ("precision", "optimizer", "compile", "batch_size", "samples_per_s", "mfu")
    return {mode: {k: row[k] for k in keys} for mode, row in best.items()}


def run(
    modes: Sequence[str] = MODES,
    precisions: Sequence[str] = ("bf16",),
    fused: Sequence[bool] = (True,),
    compiled: Sequence[bool] = (False,),
    compile_mode: str = "default",
    sdpa: str = "default",
    gelu: str = "torch",
    qkv: str = "packed",
    linear: str = "default",
    device: str | torch.device | None = None,
    smoke: bool = False,
    steps: int | None = None,
    warmup: int | None = None,
    search: bool = True,
    batch_limit: int = 4096,
    batch_sizes: Sequence[int] = (),
    name: str | None = None,
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Benchmark every combination of the arguments and write one result JSON; return its path.

    `device` None: CUDA when available, else the CPU. On the CPU `smoke` is forced and the
    largest-batch search skipped. `batch_sizes`: measure these batches instead of the paper's
    and the search's. `steps` / `warmup` None: 20 / 5 (smoke: 3 / 1). `name` None:
    "step", or "step-grid" when more than one configuration per mode runs, with "-smoke" appended
    in smoke mode.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for value, allowed, what in (
        (modes, MODES, "mode"),
        (precisions, PRECISIONS, "precision"),
    ):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise ValueError(f"{what} must be among {allowed}, got {list(value)}")
    smoke = smoke or device.type != "cuda"
    search = search and device.type == "cuda"
    steps = steps if steps is not None else (3 if smoke else 20)
    warmup = warmup if warmup is not None else (1 if smoke else 5)
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if device.type == "cuda":
        # As the trainer does with train.tf32 (default on): fp32 matmuls run as TF32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    combos = setups(modes, precisions, fused, compiled, compile_mode, sdpa, gelu, qkv, linear)
    rows: list[dict[str, Any]] = []
    for setup in combos:
        log(f"bench.step: {setup} on {device}{' (smoke)' if smoke else ''}")
        rows_here = benchmark_setup(
            setup, device, smoke, steps, warmup, search, batch_limit, batch_sizes
        )
        for row in rows_here:
            rows.append(row)
            log("  " + _format_row(row))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    flops = {
        mode: step_flops(mode, run_config(StepSetup(mode, "bf16", True, False), smoke), 1)
        for mode in modes
    }
    any_cfg = run_config(combos[0], smoke)
    payload = {
        "config": {
            "modes": list(modes),
            "precisions": list(precisions),
            "optimizers": ["fused" if f else "unfused" for f in fused],
            "compile": list(compiled),
            "compile_mode": compile_mode,
            "sdpa": sdpa,
            "gelu": gelu,
            "qkv": qkv,
            "linear": linear,
            "smoke": smoke,
            "device": str(device),
            "steps": steps,
            "warmup_steps": warmup,
            "search_max_batch": search and not batch_sizes,
            "batch_limit": batch_limit,
            "batch_sizes": list(batch_sizes) or None,
            "base_batch": dict(SMOKE_BATCH if smoke else PAPER_BATCH),
            "tf32": device.type == "cuda",
            "model": dataclasses.asdict(any_cfg.model),
            "data": {
                k: getattr(any_cfg.data, k) for k in ("num_mel_bins", "target_length", "image_size")
            },
            "grad_clip": any_cfg.optim.grad_clip,
        },
        "rows": rows,
        "summary": {
            "device": device.type,
            "device_name": device_name,
            "peak_bf16_tflops": peak_bf16_tflops(device_name),
            "flops_per_sample": {mode: f.train_per_sample for mode, f in flops.items()},
            "best": _best(rows),
        },
    }
    if name is None:
        grid = len(combos) > len(modes)
        name = "step" + ("-grid" if grid else "") + ("-smoke" if smoke else "")
    path = write_result(name, payload, results_dir)
    log(f"bench.step: wrote {path}")
    return path


def _format_row(row: dict[str, Any]) -> str:
    head = f"{row['mode']} {row['precision']} {row['optimizer']} compile={row['compile']} "
    head += f"batch={row['batch_size']} ({row['batch_kind']})"
    if row["status"] != "ok":
        return f"{head}: {row['status']} {row.get('error', '')}"
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
    mem = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "n/a"
    return (
        f"{head}: {row['step_time_ms']:.1f} ms/step, {row['samples_per_s']:.1f} samples/s, "
        f"{row['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}, peak {mem}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.step`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.step", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["bf16"])
    parser.add_argument("--unfused", action="store_true", help="torch's default AdamW")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--sdpa", default="default", choices=("default", *SDPA_BACKENDS))
    add_model_arguments(parser)
    parser.add_argument(
        "--grid",
        nargs="?",
        const="full",
        choices=("full", "eager"),
        help="every precision x fused/unfused x eager/compiled, or only eager with 'eager' "
        "(overrides the three above; a compilation per compiled configuration)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model (always on the CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (5; smoke 1)")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--batch-limit", type=int, default=4096, help="largest batch to try")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[],
        help="measure these batches instead of the paper's and the largest that fits",
    )
    parser.add_argument("--name", default=None, help="result name (default step[-grid][-smoke])")
    parser.add_argument("--results-dir", default=None, help="default: bench/results")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.grid:
        compiled = (False, True) if args.grid == "full" else (False,)
        precisions, fused = PRECISIONS, (True, False)
    else:
        precisions, fused, compiled = args.precision, (not args.unfused,), (args.compile,)
    run(
        modes=args.mode,
        precisions=precisions,
        fused=fused,
        compiled=compiled,
        compile_mode=args.compile_mode,
        sdpa=args.sdpa,
        gelu=args.gelu,
        qkv=args.qkv,
        linear=args.linear,
        device=args.device,
        smoke=args.smoke,
        steps=args.steps,
        warmup=args.warmup,
        search=not args.no_search,
        batch_limit=args.batch_limit,
        batch_sizes=args.batch_size,
        name=args.name,
        results_dir=args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
