"""Where the time goes: a torch profile of the training step alone, of the loader's device stage,
or of DALI-fed training steps, summarised as numbers a person can compare between runs.

``python -m bench.profile --what step|stage|e2e [--mode pretrain] [--size full|tiny]
[--batch-size B] [--compile] [--precision P] [--unfused] [--gelu G] [--qkv Q] [--linear L]
[--py-workers W]
[--hw-decoder-load L] [--fbank-backend F] [--cores C] [--steps N] [--data DIR] [--smoke]``

For the profiled window (``--steps`` iterations after ``--warmup`` unprofiled ones) it records
the wall time, the host time of the ops the loop called, the device time of the kernels
(``gpu_busy_frac`` = kernel time / wall time: 1 means the GPU never waited; DALI-fed steps with
a prefetch thread run the loader's kernels on streams of their own, beside the step's, so there
it can exceed 1), the number of kernel
launches and of host synchronisations (stream, device and event synchronisation, blocking copies)
per iteration, the device time by kernel class (``bench.common.KERNEL_CLASSES``: GEMMs, attention,
GELU, LayerNorm, ...), and the top kernels and ops by device time. Writes
``bench/results/profile-<what>-<host>.json`` and prints the tables. Meant for a GPU; on a CPU it
runs (``--smoke``) and records host times, and for ``--what stage`` also the stage's aten ops
and Triton launches as a GPU would run it (``gpu_policy_*``, see ``gpu_policy_counts``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import (
    add_loader_gpu_arguments,
    add_model_arguments,
    add_precision_argument,
    default_precision,
    device_ms_by_class,
)
from bench.end_to_end import bench_config, ensure_dataset, forever
from bench.step import PAPER_BATCH, StepSetup, TrainStep, synthetic_batch
from equiav.config import COMPILE_MODES
from equiav.train.step import STEP_STREAMS, step_stream

WHATS = ("step", "stage", "e2e")
# CUDA runtime/driver calls that make the host wait for the device.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def summarize_profile(prof, wall_s: float, iterations: int, top: int = 25) -> dict[str, Any]:
    """Numbers of a finished ``torch.profiler.profile`` over ``iterations`` iterations."""
    averages = prof.key_averages()
    kernels, ops = [], []
    launches = syncs = blocking_copies = 0
    device_us = 0.0
    for e in averages:
        key = e.key
        if key in LAUNCH_CALLS:
            launches += e.count
        elif key in SYNC_CALLS:
            syncs += e.count
        elif key == "cudaMemcpy":  # the synchronous copy
            blocking_copies += e.count
        self_device = getattr(e, "self_device_time_total", 0.0) or 0.0
        # Only the device's own events: host ops named after their kernel (inductor's) carry the
        # kernel's time too, "Command Buffer Full" is the host waiting for a full queue, and a
        # user annotation on the device's timeline (`Optimizer.step#AdamW.step`) spans kernels
        # counted already (as torch's own tables leave it out).
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        annotation = bool(getattr(e, "is_user_annotation", False))
        if on_device and key != "Command Buffer Full" and not annotation:
            device_us += self_device
            kernels.append((self_device, e.count, key))
        elif key.startswith("aten::"):
            device_total = getattr(e, "device_time_total", 0.0) or 0.0
            ops.append((device_total, e.cpu_time_total, e.count, key))
    kernels.sort(reverse=True)
    ops.sort(reverse=True)
    wall_us = 1e6 * wall_s
    return {
        "iterations": iterations,
        "wall_ms_per_iter": wall_us / 1e3 / iterations,
        "device_ms_per_iter": device_us / 1e3 / iterations,
        "gpu_busy_frac": device_us / wall_us if wall_us else None,
        "launches_per_iter": launches / iterations,
        "syncs_per_iter": syncs / iterations,
        "blocking_copies_per_iter": blocking_copies / iterations,
        "device_ms_by_class": device_ms_by_class(
            [(k, t / 1e3 / iterations) for t, _, k in kernels]
        ),
        "top_kernels": [
            {"name": k[:120], "device_ms_per_iter": t / 1e3 / iterations, "calls": c}
            for t, c, k in kernels[:top]
        ],
        "top_ops": [
            {
                "name": k,
                "device_ms_per_iter": d / 1e3 / iterations,
                "cpu_ms_per_iter": c / 1e3 / iterations,
                "calls_per_iter": n / iterations,
            }
            for d, c, n, k in ops[:top]
        ],
    }


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations that reach a kernel (views and metadata excluded): on a GPU
    nearly each one is a launch (or a host op on a parameter tensor), on a CPU the same count
    is the host-side cost the GPU would see."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in _FREE_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


_FREE_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


def dispatched_ops(fn: Callable[[], None]) -> int:
    """Kernel-reaching aten operations of one call of ``fn`` (see ``_OpCounter``)."""
    with _OpCounter() as counter:
        fn()
    return counter.count


class _LaunchCounter:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts a launch and does nothing."""

    def __init__(self, name: str, launches: Counter) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.launches[self.name] += 1

        return launch


def gpu_policy_counts(fn: Callable[[], None]) -> dict[str, Any]:
    """Dispatched aten ops and Triton launches of one call of ``fn`` (the loader's device stage
    on CPU tensors) as a GPU would run it: the kernels' whole-batch policy, the fused Triton
    paths and the Triton filterbank, with every Triton launch counted instead of run (its
    outputs stay unwritten, so only the counts mean anything). A CPU proxy for the stage's
    launches, the cost that bounds it on a GPU; a real GPU profile is the measurement."""
    import dali_pipelines.audio as audio
    import kernels.augment as K
    import kernels.augment_triton as fused
    import kernels.fbank as KF

    launches: Counter = Counter()
    stubs = {
        (fused, "_jitter_mean_kernel"): _LaunchCounter("color_jitter_mean", launches),
        (fused, "_jitter_kernel"): _LaunchCounter("color_jitter", launches),
        (fused, "_blur_kernel"): _LaunchCounter("gaussian_blur", launches),
        (fused, "_geometry_kernel"): _LaunchCounter("fbank_geometry", launches),
        (fused, "_finish_kernel"): _LaunchCounter("finish_visual", launches),
        (fused, "_roll_mask_kernel"): _LaunchCounter("roll_and_mask", launches),
        (fused, "_flip_transpose_kernel"): _LaunchCounter("flip_transpose_into", launches),
        (KF, "_fbank_kernel"): _LaunchCounter("fbank", launches),
        (K, "whole_batch_ops"): lambda x: True,
        (fused, "fused_path"): lambda x: True,
        (fused, "triton_interpreting"): lambda: True,
        (KF, "triton_interpreting"): lambda: True,
        # "auto" decides as on a GPU; the other backends as named
        (audio, "fbank"): lambda wave, lengths=None, backend="auto": KF.fbank(
            wave, lengths, KF.auto_backend(wave, cuda=True) if backend == "auto" else backend
        ),
    }
    if fused.triton is None or KF.triton is None:
        raise RuntimeError("gpu_policy_counts needs triton (its kernels are what it counts)")
    with contextlib.ExitStack() as stack:
        for (module, name), value in stubs.items():
            stack.enter_context(mock.patch.object(module, name, value))
        fn()  # warm-up: cached constants (fbank's DFT tables) are built once per device
        launches.clear()
        ops = dispatched_ops(fn)
    return {"dispatched_ops": ops, "triton_launches": dict(launches)}


def profiled(fn: Callable[[], None], steps: int, warmup: int, device: torch.device):
    """Run ``fn`` warmup + steps times, profiling the last ``steps``; -> (profile, wall s)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    return prof, wall


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Profile what ``a`` asks for; -> the result payload."""
    from dali_pipelines.audio import fbank_backend_for
    from dali_pipelines.loader import build_loader

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data_dir = Path(a.data)
    # bench_config reads the JPEG-frame layout (and the step only its label list): rendering
    # the VP9 layout too would cost minutes of a GPU session for nothing
    ensure_dataset(data_dir, a.clips, a.seconds, quiet=True, layouts=("frames",))
    batch_size = a.batch_size or (2 if a.smoke else PAPER_BATCH[a.mode])
    cfg = bench_config(
        data_dir,
        mode=a.mode,
        size="tiny" if a.smoke else a.size,
        smoke=a.smoke,
        batch_size=batch_size,
        threads=a.cores,
        precision=default_precision(a.precision, cuda),
        seconds=a.seconds,
        py_workers=a.py_workers,
        compile=a.compile,
        compile_mode=a.compile_mode,
        thread_prefetch=a.thread_prefetch,
        fused=not a.unfused,
        gelu=a.gelu,
        qkv=a.qkv,
        linear=a.linear,
        hw_decoder_load=a.hw_decoder_load,
        fbank_backend=a.fbank_backend,
    )
    torch.set_num_threads(a.cores)
    torch.manual_seed(0)
    iterations = a.steps
    setup = StepSetup.of(a.mode, cfg)
    if a.what == "step":
        step = TrainStep(setup, cfg, device)
        batch = synthetic_batch(a.mode, cfg, batch_size, device)
        with step_stream(a.step_stream, device):
            prof, wall = profiled(lambda: step(batch), a.steps, a.warmup, device)
    elif a.what == "stage":
        loader = build_loader(cfg, "train", a.mode, device=device)

        def stage(out):  # from the pipeline's outputs: the host-side unpacking included
            return loader._device_stage(loader.unpacked(out))

        wanted = range(a.steps + a.warmup)
        outputs = [
            {k: v.clone() for k, v in out[0].items()}
            for out, _ in zip(loader.iterator, wanted, strict=False)
        ]
        iterations = len(outputs) - a.warmup
        ops = dispatched_ops(lambda: stage(outputs[-1]))
        gpu_policy = None if cuda else gpu_policy_counts(lambda: stage(outputs[-1]))
        todo = iter(outputs)
        prof, wall = profiled(lambda: stage(next(todo)), iterations, a.warmup, device)
    else:
        step = TrainStep(setup, cfg, device)
        batches = forever(build_loader(cfg, "train", a.mode, device=device))
        with step_stream(a.step_stream, device):
            prof, wall = profiled(lambda: step(next(batches)), a.steps, a.warmup, device)
        batches.close()
    summary = summarize_profile(prof, wall, iterations)
    if a.what == "stage":
        summary["dispatched_ops_per_iter"] = ops
        if gpu_policy is not None:
            summary["gpu_policy_ops_per_iter"] = gpu_policy["dispatched_ops"]
            summary["gpu_policy_triton_launches"] = gpu_policy["triton_launches"]
    gc.collect()
    config = {
        "what": a.what,
        "mode": a.mode,
        "size": "tiny" if a.smoke else a.size,
        "batch_size": batch_size,
        "compile": a.compile,
        "compile_mode": a.compile_mode if a.compile else None,
        "gelu": cfg.model.gelu,
        "qkv": cfg.model.qkv,
        "linear": cfg.model.linear,
        "hw_decoder_load": cfg.data.hw_decoder_load,
        "fbank_backend": cfg.data.fbank_backend,
        "fbank_ran": fbank_backend_for(
            cfg.data.fbank_backend, batch_size, cfg.data.target_length, device
        ),
        "py_workers": a.py_workers,
        "thread_prefetch": a.thread_prefetch,
        "step_stream": a.step_stream if a.what != "stage" else None,
        "cores": a.cores,
        "device": str(device),
        "precision": cfg.train.precision,
        "optimizer": "fused" if cfg.optim.fused else "unfused",
    }
    # The AdamW that ran ("fused", "foreach", "for-loop"): "optimizer" is what was asked for.
    config["optimizer_impl"] = step.optimizer_impl if a.what != "stage" else None
    row = {**config, **{k: v for k, v in summary.items() if not k.startswith("top_")}}
    return {
        "rows": [row],
        "config": {
            "what": a.what,
            "mode": a.mode,
            "size": "tiny" if a.smoke else a.size,
            "batch_size": batch_size,
            "compile": a.compile,
            "py_workers": a.py_workers,
            "cores": a.cores,
            "device": str(device),
            "precision": cfg.train.precision,
            "optimizer": "fused" if cfg.optim.fused else "unfused",
            "steps": a.steps,
            "warmup_steps": a.warmup,
            "smoke": a.smoke,
        },
        "summary": summary,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.profile`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--what", choices=WHATS, default="step")
    p.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain")
    p.add_argument("--size", choices=("tiny", "full"), default="full")
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper's")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    add_model_arguments(p)
    p.add_argument("--py-workers", type=int, default=0)
    p.add_argument("--thread-prefetch", type=int, default=0, help="e2e: data.thread_prefetch")
    add_loader_gpu_arguments(p)  # stage, e2e
    add_precision_argument(p)
    p.add_argument(
        "--unfused", action="store_true", help="step, e2e: torch's unfused AdamW (default: fused)"
    )
    p.add_argument(
        "--step-stream",
        default="default",
        choices=STEP_STREAMS,
        help="step, e2e: the step's CUDA stream (train.step_stream)",
    )
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", default="runs/bench-data")
    p.add_argument("--clips", type=int, default=96, help="clips to generate when --data is empty")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length of the dataset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, few steps")
    p.add_argument("--name", default=None, help="result name (default profile-<what>)")
    p.add_argument("--results-dir", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.smoke:
        a.steps, a.warmup = min(a.steps, 2), min(a.warmup, 1)
    if a.what == "stage" and a.step_stream != "default":
        raise SystemExit("bench.profile: --step-stream is for --what step or e2e (no step here)")

    from bench.common import write_result

    payload = run(a)
    s = payload["summary"]
    print(
        f"{a.what}: {s['wall_ms_per_iter']:.1f} ms/iter wall, {s['device_ms_per_iter']:.1f} ms "
        f"kernels (GPU busy {100 * (s['gpu_busy_frac'] or 0):.0f} %), "
        f"{s['launches_per_iter']:.0f} launches, {s['syncs_per_iter']:.1f} syncs, "
        f"{s['blocking_copies_per_iter']:.1f} blocking copies per iteration"
        + (f", {s['dispatched_ops_per_iter']} aten ops" if "dispatched_ops_per_iter" in s else "")
    )
    if s["device_ms_by_class"]:
        print("  " + ", ".join(f"{c} {ms:.1f} ms" for c, ms in s["device_ms_by_class"].items()))
    for k in s["top_kernels"][:15]:
        print(f"  {k['device_ms_per_iter']:8.2f} ms  x{k['calls']:<5} {k['name']}")
    for o in s["top_ops"][:15]:
        print(
            f"  {o['device_ms_per_iter']:8.2f} ms dev {o['cpu_ms_per_iter']:8.2f} ms cpu "
            f"x{o['calls_per_iter']:<6.1f} {o['name']}"
        )
    path = write_result(a.name or f"profile-{a.what}", payload, a.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
