"""The device stage's Kaldi filterbank alone, by backend (`kernels.fbank`): how long one batch
of clips takes on the training device, and how far each backend's numbers are from torch's.

``python -m bench.fbank [--batch-sizes 16 64] [--backends torch triton triton-tf32x3]
[--repeats 30] [--data runs/bench-fbank] [--clips 64] [--seconds 10] [--device cuda|cpu] [--smoke]``

Why: in DALI-fed pretraining the filterbank runs on the GPU beside the training step, so its
time comes off the step's (the largest of the device stage's kernels in `profile-stage`). The
Triton kernel computes the 512-point DFT as dense dots (~0.4 MFLOP a frame, IEEE float32 on the
CUDA cores, or "tf32x3" on the tensor cores); "torch" is cuFFT plus a dozen memory-bound kernels.

Input: the first clips of the synthetic dataset in ``--data`` (rendered when absent, JPEG-frame
layout), their .wav files read as 16-bit PCM to float32, mean removed as the pipeline does,
repeated to fill a batch. Timing: on CUDA, CUDA events around each call after a warm-up
(compilation, cuFFT plans and constant tables stay outside), the median and the minimum of
``--repeats`` calls, and the host's median time to issue one (``host_ms``: its launches); on a
CPU the wall clock for both, and the Triton backends are "skipped" (they need CUDA; under
``TRITON_INTERPRET=1`` they run, interpreted, which checks the benchmark only). Each row also
holds the mean and max |difference| from the torch backend's result in log-mel units (the
spec's tolerance against torchaudio is a mean of 1e-4). Writes ``bench/results/fbank-<host>.json``
(``fbank-smoke-<host>.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import soundfile
import torch

from bench.common import write_result
from bench.end_to_end import dataset_paths, ensure_dataset
from equiav.data.index import read_dataset
from kernels import triton_interpreting
from kernels.fbank import BACKENDS, SAMPLE_RATE, fbank, remove_mean

DEFAULT_BACKENDS = ("torch", "triton", "triton-tf32x3")  # "auto" picks one by batch size


def read_clips(data_dir: Path, count: int) -> list[torch.Tensor]:
    """The first `count` clips' waveforms of the dataset's training list (`read_wavs`)."""
    entries = read_dataset(dataset_paths(data_dir, "frames")[0])
    if len(entries) == 0:
        raise ValueError(f"{data_dir}: the training list is empty")
    return read_wavs([entries[i].wav for i in range(min(count, len(entries)))])


def read_wavs(paths: Sequence[str | os.PathLike]) -> list[torch.Tensor]:
    """Each .wav file as a float32 mono waveform at 16 kHz; ValueError naming a file that is
    not (the filterbank's input, as the pipeline checks it)."""
    waves = []
    for path in paths:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        if rate != SAMPLE_RATE:
            raise ValueError(f"{path}: {rate} Hz, the filterbank takes {SAMPLE_RATE} Hz")
        if samples.shape[1] != 1:
            raise ValueError(f"{path}: {samples.shape[1]} channels, the pipeline takes mono")
        waves.append(torch.from_numpy(samples[:, 0].copy()))
    return waves


def make_batch(waves: Sequence[torch.Tensor], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (batch_size, N) zero-padded batch of the clips (repeated in order), mean removed, and
    their lengths."""
    rows = [waves[i % len(waves)] for i in range(batch_size)]
    lengths = torch.tensor([len(w) for w in rows])
    batch = torch.zeros(batch_size, int(lengths.max()))
    for i, w in enumerate(rows):
        batch[i, : len(w)] = w
    return remove_mean(batch, lengths), lengths


def time_calls(
    fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Milliseconds of each of `repeats` calls of `fn` after `warmup` untimed ones, (on the
    device, on the host): on a GPU the stream's time between CUDA events around the call (the
    host not waiting in between) and the host's time to issue it; on a CPU the wall clock for
    both."""
    for _ in range(warmup):
        fn()
    host = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append(1e3 * (time.perf_counter() - t0))
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in pairs], host
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - t0))
    return list(host), host


def measure(
    waves: Sequence[torch.Tensor],
    batch_sizes: Sequence[int],
    backends: Sequence[str],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """One row per (batch size, backend): its time and its distance from the torch backend."""
    rows = []
    for batch_size in batch_sizes:
        wave, lengths = make_batch(waves, batch_size)
        wave = wave.to(device)  # the lengths stay on the host, as the loader keeps them
        reference = fbank(wave, lengths, backend="torch").feats
        for backend in backends:
            row: dict[str, Any] = {"backend": backend, "batch_size": batch_size}
            if backend.startswith("triton") and device.type != "cuda" and not triton_interpreting():
                rows.append({**row, "status": "skipped: needs CUDA"})
                continue
            try:
                feats = fbank(wave, lengths, backend=backend).feats
                diff = (feats - reference).abs()
                times, host = time_calls(
                    lambda w=wave, n=lengths, b=backend: fbank(w, n, backend=b),
                    repeats,
                    warmup,
                    device,
                )
            except Exception as e:  # one backend failing (a compile error) keeps the others
                print(f"batch {batch_size:4d} {backend:14s} failed: {type(e).__name__}: {e}")
                rows.append({**row, "status": f"error: {type(e).__name__}: {e}"[:300]})
                continue
            median = statistics.median(times)
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "frames": feats.shape[1],
                    "ms": median,
                    "ms_min": min(times),
                    "host_ms": statistics.median(host),
                    "clips_per_s": 1e3 * batch_size / median,
                    "mean_abs_diff_vs_torch": diff.mean().item(),
                    "max_abs_diff_vs_torch": diff.max().item(),
                }
            )
            print(
                f"batch {batch_size:4d} {backend:14s} {median:8.3f} ms (min {min(times):.3f}), "
                f"|diff| vs torch mean {diff.mean().item():.2e} max {diff.max().item():.2e}",
                flush=True,
            )
    return rows


def summarize(rows: Sequence[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Per batch size: the fastest backend and each backend's time relative to "triton" (the
    Triton kernel with IEEE dots, the reference the other two are compared with): < 1 is
    faster."""
    summary: dict[str, Any] = {"device": str(device), "fastest": {}, "vs_triton": {}}
    for batch_size in sorted({r["batch_size"] for r in rows}):
        ok = {
            r["backend"]: r["ms"]
            for r in rows
            if r["batch_size"] == batch_size and r["status"] == "ok"
        }
        if not ok:
            continue
        summary["fastest"][str(batch_size)] = min(ok, key=ok.get)
        if "triton" in ok:
            summary["vs_triton"][str(batch_size)] = {b: ms / ok["triton"] for b, ms in ok.items()}
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.fbank`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=BACKENDS)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    # Its own folder: a set rendered here is sized for this benchmark, not for bench.loader's
    # runs/bench-data, which takes a set it finds there as it is.
    p.add_argument("--data", default="runs/bench-fbank")
    p.add_argument("--clips", type=int, default=64, help="clips to generate when --data is empty")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length of a new dataset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="a short run that checks the machinery")
    p.add_argument("--results-dir", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.smoke:
        a.batch_sizes, a.repeats, a.warmup = [2], min(a.repeats, 2), min(a.warmup, 1)
        a.clips, a.seconds = min(a.clips, 4), min(a.seconds, 2.0)
    if min(a.batch_sizes) < 1 or a.repeats < 1 or a.warmup < 0:
        raise SystemExit("--batch-sizes and --repeats must be >= 1, --warmup >= 0")
    device = torch.device(a.device)
    data_dir = Path(a.data)
    ensure_dataset(data_dir, a.clips, a.seconds, quiet=True, layouts=("frames",))
    waves = read_clips(data_dir, max(a.batch_sizes))
    rows = measure(waves, a.batch_sizes, a.backends, device, a.repeats, a.warmup)
    payload = {
        "config": {
            "batch_sizes": a.batch_sizes,
            "backends": a.backends,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "data": str(data_dir),
            "clips_read": len(waves),
            "samples_per_clip": max(len(w) for w in waves),
            "device": str(device),
            "smoke": a.smoke,
        },
        "rows": rows,
        "summary": summarize(rows, device),
    }
    path = write_result("fbank-smoke" if a.smoke else "fbank", payload, a.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
