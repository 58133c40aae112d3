"""End to end: real training steps fed by the DALI pipeline vs the paper-style loader vs no loader.

``python -m bench.end_to_end [--mode pretrain] [--size tiny|full|tiny,full] [--steps N]
[--cores C] [--py-workers W] [--thread-prefetch N] [--compile [--compile-mode M]]
[--layout frames|webm] [--data DIR] [--smoke]`` runs,
side by side in one process on the same synthetic dataset and the same model:

- ``dali-<layout>``: the trainer's loader (``dali_pipelines.loader.build_loader``: the DALI
  pipeline with ``--cores`` threads and its source in ``--py-workers`` processes (0: in the main
  thread), then its device stage) feeding training steps;
- ``baseline-<layout>``: the same steps fed by the paper-style loader (``bench.baseline``:
  ``PaperStyleDataset`` + ``make_loader`` with ``--cores`` workers), batches moved to the device
  as the original's step does (``bench.baseline.batch_to_device``); ``--baseline-work paper``
  (default) runs the original's sample path with the work it does for nothing (its ``cen_num``
  crops drawn on random images, finetuning's disabled augmented outputs), ``lean`` without it
  (rows and comparisons record ``baseline_work``);
- ``step-only``: the same step repeated on one real batch already on the device (no loading,
  no loader alive).

``--step-stream default,high-priority`` (``train.step_stream``) times the DALI-fed steps once per
setting (rows record ``step_stream``), the step on torch's current stream or on one of the
highest priority (the loader's kernels on the lowest); step-only and the paper-style loader run
with the first setting. ``--pin-cores`` then times the loader-fed steps again with the whole
process (every thread, and the loaders' threads and workers started meanwhile) pinned to
``--cores`` CPUs (``bench.common.pinned_to_cores``): ``--cores`` alone sets how many loader
threads and workers there are, which a many-core machine runs on idle cores of their own.

The step is the trainer's (``bench.step.TrainStep``: the task's model and loss from
``train.pretrain_task`` / ``finetune_task``, autocast, backward, gradient clipping, AdamW), one
process. Each row gives samples/s and the input-bound fraction ``data_wait_frac``: the time the
loop spends waiting for the next batch (as the trainer's ``StepTimer`` counts it: from asking the
loader to holding the batch on the device) over the wall time of the timed steps. GPU work is not
synchronised per step, exactly as in the trainer: the loader's work overlaps the device's, and
one synchronisation closes the timed window. ``vs_step_only`` = samples/s / step-only samples/s.
Rows also count the epochs that begin inside the timed steps (``epoch_starts``) and the graphs
torch.compile compiled in the warmup and in the timed steps: a compilation in a loader-fed
warmup would let the paper-style loader's workers bank batches for its timed steps.

Model sizes: ``tiny`` (a few-layer model, the paper's data geometry: here the loader matters) and
``full`` (the paper's ViT-B pair; on a CPU a couple of steps at batch 2, to record the figure).
``--smoke`` shrinks the tiny run further (tiny data geometry, batch 2, 2 steps) to check the
machinery. Without a GPU the loader's device stage (filterbank and augmentation kernels) runs on
the CPU too, so the DALI figures there do not measure the GPU design: the summary says so.

Writes ``bench/results/end_to_end-<host>.json`` (``end_to_end-smoke-<host>.json`` with
``--smoke``); schema: ``bench/report.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BASELINE_WORK,
    add_loader_gpu_arguments,
    add_model_arguments,
    add_precision_argument,
    cpu_fields,
    cpu_words,
    default_precision,
    median_rows,
    parse_list,
    pinned_to_cores,
    process_tree_cpu_seconds,
    row_key,
    whole_rounds,
)
from bench.step import PAPER_BATCH, SMOKE_MODEL, StepSetup, TrainStep
from equiav.config import COMPILE_MODES, Config, apply_overrides, default_config, resolve
from equiav.train.step import STEP_STREAMS, step_stream

MODES = ("pretrain", "finetune")
SIZES = ("tiny", "full")
LAYOUTS = ("frames", "webm")

#: The tiny model: the step benchmark's smoke model, but with the paper's `cen_num` so that the
#: loader draws as many sampled vectors as in real pretraining.
TINY_MODEL = {k: v for k, v in SMOKE_MODEL.items() if k != "cen_num"}
#: `--smoke` only: a smaller data geometry (the model sees 512 fbank frames, 112-pixel images).
SMOKE_OVERRIDES = {
    "data.target_length": 512,
    "data.image_size": 112,
    "augment.time_mask": 96,
    "augment.ft_timem": 96,
    "model.cen_num": SMOKE_MODEL["cen_num"],
}


def dataset_paths(data_dir: Path, layout: str) -> tuple[Path, Path]:
    """(training list, label CSV) of a synthetic dataset folder for `layout`."""
    name = "train.json" if layout == "frames" else f"train_{layout}.json"
    return data_dir / name, data_dir / "class_labels_indices.csv"


def ensure_dataset(
    data_dir: Path,
    clips: int,
    seconds: float,
    quiet: bool = False,
    layouts: Sequence[str] = LAYOUTS,
) -> None:
    """Generate the synthetic dataset in `layouts` (default frames and webm, as `bench.loader`
    does) into `data_dir` unless their training lists are already there. One layout is much
    quicker to render for a large set (VP9 encoding is most of the time)."""
    from equiav.data.synth import generate

    if all(dataset_paths(data_dir, layout)[0].exists() for layout in layouts):
        return
    generate(
        data_dir,
        clips=clips,
        classes=10,
        seed=0,
        video_format=tuple(layouts),
        seconds=seconds,
        test_fraction=0.1,
        progress=not quiet,
    )


def bench_config(
    data_dir: Path,
    *,
    mode: str,
    size: str,
    smoke: bool,
    batch_size: int,
    threads: int,
    precision: str,
    seconds: float,
    layout: str = "frames",
    py_workers: int = 0,
    compile: bool = False,
    compile_mode: str = "default",
    thread_prefetch: int = 0,
    fused: bool = True,
    gelu: str = "torch",
    qkv: str = "packed",
    linear: str = "default",
    hw_decoder_load: float = 0.65,
    fbank_backend: str = "auto",
    step_stream: str = "default",
) -> Config:
    """The trainer's configuration for one benchmark run on the synthetic dataset in `data_dir`
    (`fused`: the fused AdamW on CUDA, else torch's default; `gelu`, `qkv`, `linear`:
    model.gelu, model.qkv and model.linear; `hw_decoder_load`, `fbank_backend`:
    data.hw_decoder_load, data.fbank_backend; `step_stream`: train.step_stream).

    `size` "tiny": `TINY_MODEL` (with `smoke`: also `SMOKE_OVERRIDES`); "full": the paper's
    model and data geometry. Frames per clip follow the clip length (one per second, at most 10).
    """
    if mode not in MODES or size not in SIZES or layout not in LAYOUTS:
        raise ValueError(f"mode {mode!r}, size {size!r}, layout {layout!r}: unknown")
    train_json, label_csv = dataset_paths(data_dir, layout)
    frames = max(1, min(10, int(seconds)))
    overrides: dict[str, Any] = {
        "data.dataset": "synthetic",
        "data.train_json": str(train_json),
        "data.label_csv": str(label_csv),
        "data.audio_mean": -4.346,
        "data.audio_std": 4.332,
        "data.clip_seconds": seconds,
        "data.frames_per_clip": frames,
        "data.eval_frame": frames // 2,
        "data.num_threads": threads,
        "data.py_workers": py_workers,
        "data.thread_prefetch": thread_prefetch,
        "data.hw_decoder_load": hw_decoder_load,
        "data.fbank_backend": fbank_backend,
        "train.batch_size": batch_size,
        "train.precision": precision,
        "train.compile": compile,
        "train.compile_mode": compile_mode,
        "train.step_stream": step_stream,
        "optim.fused": fused,
        "model.gelu": gelu,
        "model.qkv": qkv,
        "model.linear": linear,
    }
    if size == "tiny":
        overrides.update({f"model.{k}": v for k, v in TINY_MODEL.items()})
        if smoke:
            overrides.update(SMOKE_OVERRIDES)
    return resolve(apply_overrides(default_config(mode), overrides, source="bench.end_to_end"))


def forever(loader) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch (a loader that yields nothing is an error)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the loader yielded no batch in a whole epoch")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[dict[str, torch.Tensor]], None],
    next_batch: Callable[[], dict[str, torch.Tensor]],
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """`warmup` untimed then `steps` timed iterations of "get a batch, run the step".

    -> samples, seconds, samples_per_s, data_wait_frac (time in `next_batch` / wall time, in
    [0, 1]), step_ms (wall time per step), data_wait_ms (waiting per step), the graphs
    torch.compile compiled in the warmup and in the timed steps, and the CPU the whole process
    tree used in the timed steps (``bench.common.cpu_fields``: the loaders' threads and worker
    processes included, so a run's real CPU share is on record beside the cores it was given).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    graphs_before = compiled_graphs()
    for _ in range(warmup):
        step(next_batch())
    sync(device)
    graphs_warm = compiled_graphs()
    wait, samples = 0.0, 0
    cpu_start = process_tree_cpu_seconds()
    start = time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - asked
        samples += len(batch["labels"])
        step(batch)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "data_wait_frac": min(1.0, wait / seconds),
        "step_ms": 1e3 * seconds / steps,
        "data_wait_ms": 1e3 * wait / steps,
        # A compilation while the paper-style loader's workers fill their prefetch queue would
        # hand its timed steps banked batches; one inside the window would time the compiler.
        "graphs_compiled_warmup": graphs_warm - graphs_before,
        "graphs_compiled_timed": compiled_graphs() - graphs_warm,
        **cpu_fields(cpu_start, seconds, samples),
    }


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def baseline_loader(cfg: Config, mode: str, workers: int, seed: int = 0, work: str = "paper"):
    """`bench.baseline`'s paper-style DataLoader over `cfg.data.train_json`, set up like `cfg`
    (sizes, normalisation, augmentation probabilities, mixup, quirk switches); `work`: "paper"
    (the original's unused work done too) or "lean" (`PaperStyleDataset`'s `unused_work`)."""
    if work not in BASELINE_WORK:
        raise ValueError(f"baseline work must be one of {BASELINE_WORK}, got {work!r}")
    from bench.baseline import AugmentProbs, PaperStyleDataset, make_loader

    a, d = cfg.augment, cfg.data
    probs = AugmentProbs(
        specaug=a.specaug_p,
        audio_jitter=a.jitter_p,
        audio_blur=a.blur_p,
        audio_flip=a.flip_p,
        visual_jitter=a.jitter_p,
        visual_blur=a.blur_p,
        visual_flip=a.flip_p,
        visual_gray=a.gray_p,
    )
    dataset = PaperStyleDataset(
        d.train_json,
        d.label_csv,
        mode=mode,
        audio_mean=d.resolved_mean(),
        audio_std=d.resolved_std(),
        target_length=d.target_length,
        frames_per_clip=d.frames_per_clip,
        eval_frame=d.eval_frame,
        image_size=d.image_size,
        cen_num=cfg.model.cen_num if cfg.model.cen_mean else 0,
        seed=seed,
        probs=probs,
        mixup=a.mixup,
        noise=a.noise,
        finetune_specaug=cfg.quirks.ft_specaug,
        unused_work=work == "paper",
    )
    return make_loader(dataset, cfg.train.batch_size, workers, seed=seed)


def epoch_starts(per_epoch: int, steps: int, warmup: int) -> int:
    """How many epochs begin at a timed batch (0-based batches warmup .. warmup + steps - 1) of a
    loader with `per_epoch` batches an epoch; each start restarts the loader's pipeline, which the
    timed rate includes (a small benchmark set starts epochs far more often than training)."""
    if per_epoch < 1:
        raise ValueError(f"a loader with {per_epoch} batches an epoch")
    # Multiples of per_epoch in [warmup, warmup + steps - 1] (floor division: 0 counts when
    # warmup is 0).
    return (warmup + steps - 1) // per_epoch - (warmup - 1) // per_epoch


def _row(base: dict[str, Any], pipeline: str, timing: dict[str, float]) -> dict[str, Any]:
    return {**base, "pipeline": pipeline, "status": "ok", **timing}


def _probe_batch(cfg: Config, mode: str, device: torch.device) -> dict[str, Any]:
    """A private copy of the first batch of a probe loader that is gone when this returns: real
    data on the device for the step-only timing, with no pipeline threads running beside it."""
    from dali_pipelines.loader import build_loader

    probe = forever(build_loader(cfg, "train", mode, device=device))
    # A private copy: DALI's iterator may refill the tensors it handed out.
    fixed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in next(probe).items()}
    probe.close()
    del probe
    gc.collect()
    return fixed


def _loader_fed_rows(
    step: TrainStep,
    cfg: Config,
    mode: str,
    device: torch.device,
    steps: int,
    warmup: int,
    streams: Sequence[str],
    base: dict[str, Any],
    pinned_cores: list[int] | None,
    work: str = "paper",
) -> list[dict[str, Any]]:
    """Rows dali-<layout>, one per step stream of `streams` (for each a fresh loader feeds the
    steps, and is freed before the next), then baseline-<layout> (the step on `streams[0]`,
    the paper-style loader doing `work`, `baseline_loader`); every row records
    `pinned_cores`. A run that fails (out of memory, a killed worker) gives an error row and
    the others still run: an experimental setting must not cost a GPU session the rest of its
    comparison."""
    from dali_pipelines.loader import build_loader

    layout, pinned = base["layout"], {"pinned_cores": pinned_cores}
    rows = []
    for setting in streams:
        stream = loader = None
        try:
            loader = build_loader(cfg, "train", mode, device=device)
            with step_stream(setting, device) as stream:
                timing = _fed_timing(step, loader, lambda b: b, steps, warmup, device)
        except Exception as e:  # noqa: BLE001 (recorded in the row; the other runs go on)
            timing = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        rows.append(_row(base, f"dali-{layout}", {**timing, **_stream_fields(setting, stream)}))
        del loader
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stream = None
    try:
        with step_stream(streams[0], device) as stream:
            baseline = _baseline_timing(step, cfg, mode, device, steps, warmup, work)
    except Exception as e:  # noqa: BLE001 (recorded in the row; the DALI-fed rows stand)
        baseline = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    gc.collect()
    fields = {**baseline, **_stream_fields(streams[0], stream), "baseline_work": work}
    rows.append(_row(base, f"baseline-{layout}", fields))
    return [{**row, **pinned} for row in rows]


def _stream_fields(setting: str, stream: torch.cuda.Stream | None) -> dict[str, Any]:
    """A row's record of the stream its steps ran on: the setting and, on a GPU with a stream
    of its own, that stream's priority (lower is higher)."""
    return {"step_stream": setting, "step_stream_priority": getattr(stream, "priority", None)}


def _baseline_timing(
    step: TrainStep,
    cfg: Config,
    mode: str,
    device: torch.device,
    steps: int,
    warmup: int,
    work: str = "paper",
) -> dict[str, float]:
    """Timing of the steps fed by the paper-style loader doing `work` (its workers end with it
    on return), its batches taken to the device as the original's step takes them."""
    from bench.baseline import batch_to_device

    loader = baseline_loader(cfg, mode, cfg.data.num_threads, seed=cfg.train.seed, work=work)
    return _fed_timing(step, loader, lambda b: batch_to_device(b, device), steps, warmup, device)


def _fed_timing(step, loader, prepare, steps: int, warmup: int, device: torch.device) -> dict:
    """``time_steps`` of the steps fed by ``loader`` epoch after epoch (each batch through
    ``prepare``), with how many epochs begin inside the timed steps; the loader's iteration is
    closed on return."""
    starts = epoch_starts(len(loader), steps, warmup)
    batches = forever(loader)
    try:
        timing = time_steps(step, lambda: prepare(next(batches)), steps, warmup, device)
        return {**timing, "epoch_starts": starts}
    finally:
        batches.close()


def measure_model(
    cfg: Config,
    mode: str,
    size: str,
    device: torch.device,
    steps: int,
    warmup: int,
    layout: str,
    log: Callable[[str], None] = print,
    streams: Sequence[str] | None = None,
    pin: bool = False,
    repeats: int = 1,
    baseline_work: str = "paper",
    unpinned: bool = True,
) -> list[dict[str, Any]]:
    """Rows step-only, dali-<layout> (one per step stream of `streams`, default
    `cfg.train.step_stream`) and baseline-<layout> for one model (`cfg`): one model and
    optimizer, built once and seeded, serve all of them. Both loaders get `cfg.data.num_threads`
    cores (DALI threads, DataLoader workers). `pin`: then the loader-fed rows again with the
    whole process pinned to that many CPUs (`bench.common.pinned_to_cores`; rows record
    `pinned_cores`, None for the others). Step-only (where torch.compile compiles, on the
    machine's cores) is the device's rate either way. `repeats`: the loader-fed runs in that
    many alternating rounds, each row the median round's (`bench.common.median_rows`) with
    every round's samples/s, and a DALI-fed row the ratio to the paper-style run of each round
    (`with_round_ratios`); step-only, the device's own rate, is timed once. `baseline_work`:
    the paper-style loader's `work` (`baseline_loader`). `unpinned=False` with `pin`: the
    loader-fed runs pinned only (they answer both targets: the share of step-only and the ratio
    at the same CPU share), for a GPU session short of time."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not (pin or unpinned):
        raise ValueError("nothing to time: neither unpinned nor pinned loader-fed runs")
    from dali_pipelines.audio import fbank_backend_for

    setup = StepSetup.of(mode, cfg)
    step = TrainStep(setup, cfg, device)
    base = {
        "mode": mode,
        "model": size,
        "layout": layout,
        "batch_size": cfg.train.batch_size,
        "precision": cfg.train.precision,
        "steps": steps,
        "warmup_steps": warmup,
        "cores": cfg.data.num_threads,
        "py_workers": cfg.data.py_workers,
        "thread_prefetch": cfg.data.thread_prefetch,
        "hw_decoder_load": cfg.data.hw_decoder_load,
        "fbank_backend": cfg.data.fbank_backend,
        "fbank_ran": fbank_backend_for(
            cfg.data.fbank_backend, cfg.train.batch_size, cfg.data.target_length, device
        ),
        "compile": cfg.train.compile,
        "compile_mode": cfg.train.compile_mode if cfg.train.compile else None,
        "gelu": cfg.model.gelu,
        "qkv": cfg.model.qkv,
        "linear": cfg.model.linear,
        "device": str(device),
    }
    streams = list(streams or [cfg.train.step_stream])
    fixed = _probe_batch(cfg, mode, device)
    with step_stream(streams[0], device) as stream:  # first: torch.compile compiles here
        step_only = time_steps(step, lambda: fixed, steps, warmup, device)
    fixed = None  # its device memory freed before the loader-fed runs
    first = {**_stream_fields(streams[0], stream), "pinned_cores": None}
    rows = [_row(base, "step-only", {**step_only, **first})]
    rounds = []
    for _ in range(repeats):
        args = (step, cfg, mode, device, steps, warmup, streams, base)
        fed = _loader_fed_rows(*args, None, baseline_work) if unpinned else []
        if pin:
            try:
                with pinned_to_cores(cfg.data.num_threads) as cpus:
                    fed += _loader_fed_rows(*args, cpus, baseline_work)
            except Exception as e:  # noqa: BLE001 (the rows above stand; this one says why)
                error = {"status": "error", "error": f"{type(e).__name__}: {e}"}
                fed.append({**base, **first, "pipeline": "pinned-runs", **error})
        rounds.append(fed)
    rows += with_round_ratios(median_rows(rounds), rounds)
    for row in rows:
        if row["status"] != "ok":
            log(f"  {size}/{mode} {row['pipeline']} ({row['step_stream']}): {row['error']}")
            continue
        row["step_only_samples_per_s"] = step_only["samples_per_s"]
        row["vs_step_only"] = row["samples_per_s"] / step_only["samples_per_s"]
        how = [row["step_stream"]] + (["pinned"] if row["pinned_cores"] else [])
        log(
            f"  {size}/{mode} {row['pipeline']} ({', '.join(how)}): "
            f"{row['samples_per_s']:.2f} samples/s"
        )
        if row["graphs_compiled_timed"]:
            log(f"  warning: {row['pipeline']}: torch.compile ran inside the timed steps")
        if row.get("epoch_starts"):
            # Each start drains and refills the loader: a real dataset's steady state has few.
            log(
                f"  warning: {row['pipeline']}: {row['epoch_starts']} epoch start(s) inside the "
                "timed steps (a larger --clips keeps them out)"
            )
    return rows


def with_round_ratios(
    rows: list[dict[str, Any]], rounds: Sequence[Sequence[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``rows`` with each DALI-fed row's ``round_vs_baseline``: per round, its samples/s over
    the paper-style run of the same pinning in that round (None where either failed): how much
    the ratio moves from round to round, which the median rows alone do not show."""

    def ratios(row: dict[str, Any]) -> list[float | None]:
        out = []
        for runs in rounds:
            ok = [r for r in runs if r.get("status") == "ok"]
            dali = next((r for r in ok if row_key(r) == row_key(row)), None)
            base = _paired_baseline(row, ok)
            both = dali is not None and base is not None
            out.append(dali["samples_per_s"] / base["samples_per_s"] if both else None)
        return out

    return [
        {**row, "round_vs_baseline": ratios(row)}
        if str(row.get("pipeline", "")).startswith("dali-")
        else row
        for row in rows
    ]


def _error_rows(mode: str, size: str, layout: str, error: BaseException) -> list[dict[str, Any]]:
    message = f"{type(error).__name__}: {error}"
    return [
        {"mode": mode, "model": size, "pipeline": p, "status": "error", "error": message}
        for p in ("step-only", f"dali-{layout}", f"baseline-{layout}")
    ]


def summarize(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Per (model, mode) and per DALI-fed row: DALI vs the paper-style loader run with the same
    pinning (``pinned_cores``), both vs step-only, and their wait fractions. With rounds
    (``round_vs_baseline``) the ratio is the median of the rounds' ratios, each DALI-fed run
    over the paper-style run of its own round (the median rows of the two loaders may come from
    different rounds); the CPU figures are each loader's median row's."""
    comparisons = []
    ok = [r for r in rows if r.get("status") == "ok"]
    for size, mode in dict.fromkeys((r["model"], r["mode"]) for r in ok):
        group = [r for r in ok if (r["model"], r["mode"]) == (size, mode)]
        if not any(r["pipeline"] == "step-only" for r in group):
            continue
        for dali in (r for r in group if r["pipeline"].startswith("dali-")):
            base = _paired_baseline(dali, group)
            if base is None:
                continue
            comparisons.append(
                {
                    "model": size,
                    "mode": mode,
                    "step_stream": dali.get("step_stream", "default"),
                    "pinned_cores": dali.get("pinned_cores"),
                    "dali_vs_baseline": _ratio(dali, base),
                    "baseline_work": base.get("baseline_work", "lean"),
                    "dali_vs_step_only": dali["vs_step_only"],
                    "baseline_vs_step_only": base["vs_step_only"],
                    "dali_data_wait_frac": dali["data_wait_frac"],
                    "baseline_data_wait_frac": base["data_wait_frac"],
                    "dali_vs_baseline_rounds": dali.get("round_vs_baseline"),
                    "dali_cpu_cores_busy": dali.get("cpu_cores_busy"),
                    "baseline_cpu_cores_busy": base.get("cpu_cores_busy"),
                }
            )
    summary: dict[str, Any] = {"device": device.type, "comparisons": comparisons}
    if device.type != "cuda":
        summary["note"] = (
            "no GPU: the DALI loader's device stage (filterbank, augmentation kernels) and the "
            "training step share the CPU with the loaders, so these figures check the benchmark "
            "and do not measure the GPU design"
        )
    return summary


def _ratio(dali: dict[str, Any], base: dict[str, Any]) -> float:
    """DALI-fed over paper-style samples/s: the median of the rounds' ratios where the row has
    rounds, else the two rows' ratio."""
    rounds = [r for r in dali.get("round_vs_baseline") or [] if r is not None]
    return statistics.median(rounds) if rounds else dali["samples_per_s"] / base["samples_per_s"]


def _paired_baseline(dali: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict | None:
    """The paper-style row among ``rows`` that a DALI-fed row is compared with: the one run
    with the same pinning (None when there is none)."""
    return next(
        (
            r
            for r in rows
            if r["pipeline"].startswith("baseline-") and _pinning(r) == _pinning(dali)
        ),
        None,
    )


def _pinning(row: dict[str, Any]) -> tuple[int, ...] | None:
    """The CPUs a row's run was pinned to, hashable (None: not pinned)."""
    cpus = row.get("pinned_cores")
    return tuple(cpus) if cpus else None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.end_to_end`."""
    p = argparse.ArgumentParser(
        prog="python -m bench.end_to_end", description=__doc__.split("\n")[0]
    )
    p.add_argument("--mode", default="pretrain", help="pretrain, finetune or pretrain,finetune")
    p.add_argument("--size", default="tiny", help="tiny, full or tiny,full")
    p.add_argument("--data", default="runs/bench-data", help="synthetic dataset folder")
    p.add_argument("--clips", type=int, default=96, help="clips to generate when --data is empty")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length of the dataset")
    p.add_argument("--layout", default="frames", choices=LAYOUTS)
    p.add_argument("--cores", type=int, default=2, help="DALI threads / baseline workers")
    p.add_argument(
        "--py-workers", type=int, default=0, help="DALI source worker processes (data.py_workers)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    add_model_arguments(p)
    add_loader_gpu_arguments(p)
    p.add_argument(
        "--step-stream",
        default="default",
        help="train.step_stream for the DALI-fed steps, or several (default,high-priority): "
        "one DALI-fed row each; step-only and the paper-style loader use the first",
    )
    p.add_argument(
        "--pin-cores",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="then time the loader-fed steps again with the whole process (every thread, and "
        "the loaders' workers) pinned to --cores CPUs: the CPU share of one GPU on a node",
    )
    p.add_argument(
        "--unpinned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the loader-fed steps unpinned (--no-unpinned with --pin-cores: pinned only)",
    )
    p.add_argument(
        "--baseline-work",
        default="paper",
        choices=BASELINE_WORK,
        help="the paper-style loader: paper = its code's sample path with the work it does "
        "for nothing (cen_num crops drawn on random images, finetuning's disabled outputs); "
        "lean = without it (bench.baseline's unused_work)",
    )
    p.add_argument(
        "--thread-prefetch",
        type=int,
        default=0,
        help="batches made ahead in a background thread (data.thread_prefetch; 0: none)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="the loader-fed runs in this many alternating rounds; rows are the median round's",
    )
    p.add_argument("--batch-size", type=int, default=None, help="tiny (default: paper; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; smoke 1)")
    p.add_argument("--full-batch-size", type=int, default=None, help="default: paper; CPU 2")
    p.add_argument("--full-steps", type=int, default=None, help="default: --steps; CPU 2")
    add_precision_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny, fast run that checks the machinery")
    p.add_argument("--results-dir", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    from bench.common import write_result

    prog = "bench.end_to_end"
    modes = parse_list(a.mode, MODES, "mode", prog)
    sizes = parse_list(a.size, SIZES, "size", prog)
    streams = parse_list(a.step_stream, STEP_STREAMS, "step-stream", prog)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    precision = default_precision(a.precision, cuda)
    steps = a.steps if a.steps is not None else (2 if a.smoke else 20)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    if a.cores < 1 or a.repeats < 1:
        raise SystemExit("bench.end_to_end: --cores and --repeats must be >= 1")
    if not (a.unpinned or a.pin_cores):
        raise SystemExit("bench.end_to_end: --no-unpinned needs --pin-cores (nothing to time)")
    data_dir = Path(a.data)
    ensure_dataset(data_dir, a.clips, a.seconds, quiet=a.smoke, layouts=(a.layout,))
    torch.set_num_threads(a.cores)  # the step's own share; the loaders get --cores each
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer (train.tf32)
        torch.backends.cudnn.allow_tf32 = True

    rows: list[dict[str, Any]] = []
    plan: dict[str, dict[str, Any]] = {}
    for size in sizes:
        full = size == "full"
        for mode in modes:
            batch = 2 if a.smoke else PAPER_BATCH[mode]
            if full:
                batch = a.full_batch_size or (PAPER_BATCH[mode] if cuda else 2)
            elif a.batch_size:
                batch = a.batch_size
            size_steps = (a.full_steps or (steps if cuda else 2)) if full else steps
            size_warmup = min(warmup, 1) if full and not cuda else warmup
            # The paper-style loader's workers deliver batches in rounds: time whole rounds.
            size_steps = whole_rounds(size_steps, a.cores)
            plan[f"{size}/{mode}"] = {
                "batch_size": batch,
                "steps": size_steps,
                "warmup_steps": size_warmup,
            }
            print(f"bench.end_to_end: {size} model, {mode}, batch {batch} on {device}", flush=True)
            try:
                cfg = bench_config(
                    data_dir,
                    mode=mode,
                    size=size,
                    smoke=a.smoke,
                    batch_size=batch,
                    threads=a.cores,
                    precision=precision,
                    seconds=a.seconds,
                    layout=a.layout,
                    py_workers=a.py_workers,
                    compile=a.compile,
                    compile_mode=a.compile_mode,
                    thread_prefetch=a.thread_prefetch,
                    gelu=a.gelu,
                    qkv=a.qkv,
                    linear=a.linear,
                    hw_decoder_load=a.hw_decoder_load,
                    fbank_backend=a.fbank_backend,
                    step_stream=streams[0],
                )
                torch.manual_seed(0)
                rows += measure_model(
                    cfg,
                    mode,
                    size,
                    device,
                    size_steps,
                    size_warmup,
                    a.layout,
                    streams=streams,
                    pin=a.pin_cores,
                    repeats=a.repeats,
                    baseline_work=a.baseline_work,
                    unpinned=a.unpinned,
                )
            except Exception as e:  # one failed size (e.g. out of memory) must not end the run
                print(f"  failed: {type(e).__name__}: {e}", flush=True)
                rows += _error_rows(mode, size, a.layout, e)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    payload = {
        "config": {
            "modes": modes,
            "sizes": sizes,
            "layout": a.layout,
            "cores": a.cores,
            "py_workers": a.py_workers,
            "compile": a.compile,
            "compile_mode": a.compile_mode,
            "thread_prefetch": a.thread_prefetch,
            "step_streams": streams,
            "pin_cores": a.pin_cores,
            "unpinned": a.unpinned,
            "repeats": a.repeats,
            "device": str(device),
            "precision": precision,
            "smoke": a.smoke,
            "baseline_work": a.baseline_work,
            # As asked; each run's own (whole rounds, a CPU's full size) in "runs".
            "requested_steps": steps,
            "requested_warmup_steps": warmup,
            "data": str(data_dir),
            "seconds": a.seconds,
            "runs": plan,
        },
        "rows": rows,
        "summary": summarize(rows, device),
    }
    path = write_result("end_to_end-smoke" if a.smoke else "end_to_end", payload, a.results_dir)
    for c in payload["summary"]["comparisons"]:
        how = [] if c["step_stream"] == "default" else [f"{c['step_stream']} step stream"]
        how += [f"pinned to CPUs {c['pinned_cores']}"] if c["pinned_cores"] else []
        how += [f"paper-style loader: {c['baseline_work']}"]
        stream = f" ({', '.join(how)})" if how else ""
        print(
            f"{c['model']}/{c['mode']}{stream}: DALI / baseline {c['dali_vs_baseline']:.2f}x, "
            f"DALI at {100 * c['dali_vs_step_only']:.0f} % of step-only "
            f"(waiting {100 * c['dali_data_wait_frac']:.0f} %), baseline at "
            f"{100 * c['baseline_vs_step_only']:.0f} % "
            f"(waiting {100 * c['baseline_data_wait_frac']:.0f} %)"
            + (f", {cpu_words(c)}" if cpu_words(c) else "")
        )
    print(f"wrote {path}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
