"""Scaling: 1..N processes under torchrun, each with its own DALI pipeline on its own shard, DDP.

``python -m bench.scaling [--max-procs N | --procs 1,2,4] [--smoke] [--steps N] [--threads T]``
launches, for every process count k, ``python -m torch.distributed.run --standalone
--nproc_per_node k -m bench.scaling --worker ...``. Each worker joins the process group as the
trainer does (``equiav.train.dist.init_distributed``: NCCL with GPUs, gloo on the CPU), builds the
trainer's loader for its shard (``build_loader`` with ``Shard(rank, k)``) and the tiny model
wrapped in ``DistributedDataParallel``, times its DALI pipeline alone (the pipeline's output before
the device stage: the CPU work per sample) and then a few real training steps (the trainer's step,
``bench.step.TrainStep``, gradients all-reduced by DDP, features gathered by the loss). Rank 0
gathers every rank's numbers.

Rows (one per k; ``gpus`` = processes): global ``samples_per_s`` (all samples over the slowest
rank's wall time), per-process samples/s, data-wait fraction (the input-bound share of the step
time), the per-process DALI pipeline rate and its rate per thread, the scaling efficiency
against the smallest k, and two checks of the mechanics: ``shards_disjoint`` (in the first epoch
no two ranks read the same sample) and ``replicas_in_sync`` (after the DDP steps every rank holds
the same weights, compared by a float64 checksum). On a CPU-only machine the processes share its
cores: the run checks the mechanics and the per-process input pipeline, it does not measure
scaling.

The summary carries a capacity model (``capacity_model``) of what 8 GPUs and several nodes need
from the input pipeline, storage and interconnect, from a per-GPU consumption rate (an argument, a
GPU step result in the results folder, or MEASURED.md's estimate), the media bytes a sample reads
(measured on the synthetic dataset; AudioSet-like real media estimated), the DALI rate per core
measured here and the ViT-B pair's parameter count. Writes ``bench/results/scaling-<host>.json``
(``scaling-smoke-<host>.json`` with ``--smoke``); schema: ``bench/report.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import add_precision_argument, default_precision

REPO = Path(__file__).resolve().parent.parent

#: Per-GPU rate used when neither an argument nor a GPU step result gives one: MEASURED.md's
#: estimate for the paper-size pretrain step on an H100 at 45-50 % MFU (560-630 samples/s).
ESTIMATED_PER_GPU_SAMPLES_PER_S = 600.0
#: AudioSet-like real media: a 10 s, 16 kHz, 16-bit mono wav (44-byte header) is exact; the
#: size of a pre-extracted JPEG frame is an assumption (override with --real-frame-kb).
REAL_WAV_BYTES = 10 * 16000 * 2 + 44
ASSUMED_REAL_FRAME_BYTES = 30_000
PAPER_BATCH_PER_GPU = 16  # pretraining, per GPU
#: Share of the step in which DDP can overlap the gradient all-reduce: the backward pass, about
#: two thirds of a step's FLOPs (backward = 2 x forward).
BACKWARD_SHARE = 2 / 3


# ----------------------------------------------------------------------------------------------
# The capacity model


def _ring_bytes(participants: int, nbytes: float) -> float:
    """Bytes each participant sends (and receives) in a ring all-reduce of `nbytes`."""
    return 2.0 * (participants - 1) / participants * nbytes


def pretrain_param_count() -> int:
    """Trainable parameters of the paper-size pretraining model (the ViT-B pair with its
    predictors and heads), counted on the meta device (no memory, no arithmetic)."""
    from equiav.config import default_config
    from equiav.model import EquiAVPretrain, count_parameters

    cfg = default_config("pretrain")
    with torch.device("meta"):
        model = EquiAVPretrain(cfg.model, cfg.data)
    return sum(count_parameters(model).values())


def capacity_model(
    per_gpu_samples_per_s: float,
    bytes_per_sample: float | Mapping[str, float],
    *,
    param_count: int | None = None,
    dali_samples_per_s_per_core: float | None = None,
    batch_per_gpu: int = PAPER_BATCH_PER_GPU,
    gpus_per_node: int = 8,
    cores_per_node: int | None = 16,
    nodes: Sequence[int] = (1, 2, 4, 8),
    overlap_fraction: float = BACKWARD_SHARE,
    host_mib_per_gpu: float | None = None,
) -> dict[str, Any]:
    """What a node of `gpus_per_node` GPUs, and `nodes` such nodes, need to keep every GPU busy at
    `per_gpu_samples_per_s` (the training step's own rate, without loading).

    - input: samples/s per node; storage reads in MB/s (1e6 bytes) per node and in total, for
      each media kind in `bytes_per_sample` (bytes one sample reads; a number is named
      "measured"); with `dali_samples_per_s_per_core`, the CPU cores the DALI pipeline needs per
      GPU and per node, and whether `cores_per_node` suffice; with `host_mib_per_gpu` (a
      training process and its source workers, holding the dataset list), the node's host
      memory for them;
    - gradient all-reduce: `param_count` (default: the paper-size pretraining model) x 2 bytes
      (bf16: precision "bf16-master") / 4 bytes (fp32: what DDP sends under autocast, whose
      parameters stay fp32) per step; the step lasts `batch_per_gpu / per_gpu_samples_per_s` and the
      all-reduce can hide in `overlap_fraction` of it (the backward pass). A ring all-reduce of S
      bytes over n participants sends 2 (n - 1) / n x S per participant: within a node (NVLink) per
      GPU with n = gpus_per_node; across m nodes per node with n = m (hierarchical: reduce-scatter
      in the node, each GPU all-reduces its 1/gpus_per_node shard over its own NIC, all-gather in
      the node), so one NIC per GPU carries 1/gpus_per_node of the node's traffic.

    Bandwidths are in GB/s (1e9 bytes/s) per direction; NIC figures also in Gbit/s.
    """
    if per_gpu_samples_per_s <= 0 or batch_per_gpu < 1 or gpus_per_node < 1:
        raise ValueError("need per_gpu_samples_per_s > 0, batch_per_gpu >= 1, gpus_per_node >= 1")
    if not 0 < overlap_fraction <= 1:
        raise ValueError(f"overlap_fraction must be in (0, 1], got {overlap_fraction}")
    if any(m < 1 for m in nodes):
        raise ValueError(f"node counts must be >= 1, got {list(nodes)}")
    media = (
        {"measured": float(bytes_per_sample)}
        if isinstance(bytes_per_sample, (int, float))
        else {k: float(v) for k, v in bytes_per_sample.items()}
    )
    params = pretrain_param_count() if param_count is None else int(param_count)
    g, rate = gpus_per_node, float(per_gpu_samples_per_s)
    node_rate = g * rate
    step_s = batch_per_gpu / rate
    window_s = step_s * overlap_fraction
    grad = {"bf16": 2.0 * params, "fp32": 4.0 * params}

    per_node: dict[str, Any] = {
        "gpus": g,
        "samples_per_s": node_rate,
        "bytes_per_sample": media,
        "storage_read_mb_per_s": {k: node_rate * b / 1e6 for k, b in media.items()},
        "dali_samples_per_s_per_core": dali_samples_per_s_per_core,
        "dali_cores_per_gpu": None,
        "dali_cores_needed": None,
        "cores_available": cores_per_node,
        "cores_suffice": None,
        "host_mib_per_gpu": host_mib_per_gpu,
        "host_gib": None if host_mib_per_gpu is None else g * host_mib_per_gpu / 1024,
    }
    if dali_samples_per_s_per_core:
        per_node["dali_cores_per_gpu"] = rate / dali_samples_per_s_per_core
        per_node["dali_cores_needed"] = node_rate / dali_samples_per_s_per_core
        if cores_per_node is not None:
            per_node["cores_suffice"] = per_node["dali_cores_needed"] <= cores_per_node
    allreduce = {
        "param_count": params,
        "grad_bytes": grad,
        "window_s": window_s,
        "intra_node_gb_per_s_per_gpu": {
            k: _ring_bytes(g, s) / window_s / 1e9 for k, s in grad.items()
        },
    }
    scale = []
    for m in nodes:
        inter = {k: _ring_bytes(m, s) / window_s / 1e9 for k, s in grad.items()}
        scale.append(
            {
                "nodes": m,
                "gpus": m * g,
                "samples_per_s": m * node_rate,
                "storage_read_mb_per_s": {k: m * node_rate * b / 1e6 for k, b in media.items()},
                "inter_node_gb_per_s_per_node": inter,
                "inter_node_gbit_per_s_per_nic": {k: 8 * v / g for k, v in inter.items()},
            }
        )
    return {
        "per_gpu_samples_per_s": rate,
        "batch_per_gpu": batch_per_gpu,
        "step_time_s": step_s,
        "overlap_fraction": overlap_fraction,
        "per_node": per_node,
        "allreduce": allreduce,
        "nodes": scale,
    }


# ----------------------------------------------------------------------------------------------
# Inputs of the model: media bytes, the per-GPU rate


def media_bytes_per_sample(json_path: str | os.PathLike, views: int = 2) -> float:
    """Mean bytes one training sample reads from storage in a dataset list: its wav plus `views`
    frame reads (a JPEG of the frames layout, averaged over every frame present, or the whole
    video file, which the pipeline reads once per view)."""
    from equiav.data.index import read_dataset
    from equiav.data.media import store

    entries = read_dataset(json_path)
    if not entries:
        raise ValueError(f"{json_path}: the dataset has no entries")

    def size(path: str) -> int | None:  # a file or a shard member
        stat = store().stat(path)
        return None if stat is None else stat[0]

    wav = statistics.fmean(size(e.wav) for e in entries)
    frames = []
    for e in entries:
        if e.is_video_file:
            frames.append(size(e.video_path))
        else:
            frames += [s for k in range(10) if (s := size(e.frame_path(k))) is not None]
    if not frames:
        raise ValueError(f"{json_path}: no frame or video file found for any entry")
    return wav + views * statistics.fmean(frames)


def _results(results_dir: str | os.PathLike | None, pattern: str):
    """(file name, result) of every readable result in `results_dir` matching `pattern`."""
    from bench.common import DEFAULT_RESULTS_DIR, ResultError, read_result

    directory = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    for path in sorted(directory.glob(pattern)):
        try:
            yield path.name, read_result(path)
        except ResultError:
            continue


def _gpu_results(results_dir: str | os.PathLike | None, pattern: str):
    """(file name, result) of every readable GPU result in `results_dir` matching `pattern`."""
    from bench.common import ran_on_gpu

    return ((name, r) for name, r in _results(results_dir, pattern) if ran_on_gpu(r))


def gpu_step_rate(results_dir: str | os.PathLike | None) -> tuple[float, str] | None:
    """The best pretraining step samples/s at the paper batch among GPU results in
    `results_dir` (bench.step's rows, and bench.end_to_end's full-size step-only rows), with
    where it came from; None when there is none."""
    best: tuple[float, str] | None = None
    for name, result in _gpu_results(results_dir, "step*.json"):
        for row in result["rows"]:
            ok = row.get("status") == "ok" and row.get("mode") == "pretrain"
            if ok and row.get("batch_kind") == "paper" and row.get("samples_per_s"):
                if best is None or row["samples_per_s"] > best[0]:
                    best = (float(row["samples_per_s"]), name)
    for name, result in _gpu_results(results_dir, "end_to_end*.json"):
        for row in result["rows"]:
            ok = row.get("status") == "ok" and row.get("mode") == "pretrain"
            paper = row.get("model") == "full" and row.get("batch_size") == PAPER_BATCH_PER_GPU
            if ok and paper and row.get("pipeline") == "step-only" and row.get("samples_per_s"):
                if best is None or row["samples_per_s"] > best[0]:
                    best = (float(row["samples_per_s"]), f"{name} (step-only)")
    return best


def gpu_loader_rate(results_dir: str | os.PathLike | None) -> tuple[float, str] | None:
    """The best DALI pretraining pipeline samples/s per DALI thread on JPEG frame files among
    GPU loader results in `results_dir` (bench.loader rows with the source inline, so that the
    threads are its only workers), with where it came from; None when there is none."""
    best: tuple[float, str] | None = None
    for name, result in _gpu_results(results_dir, "loader*.json"):
        for row in result["rows"]:
            dali = row.get("pipeline", "").startswith("dali-") and row.get("layout") == "frames"
            inline = not row.get("py_workers") and row.get("threads")
            if dali and inline and row.get("storage", "files") == "files":
                rate = float(row["samples_per_s"]) / row["threads"]
                if best is None or rate > best[0]:
                    best = (rate, f"{name} ({row['pipeline']}, {row['threads']} threads)")
    return best


def gpu_training_cpu_rate(results_dir: str | os.PathLike | None) -> tuple[float, str] | None:
    """Samples per CPU-second of DALI-fed full-size pretraining among GPU end-to-end results in
    `results_dir` (rows that measured their CPU: `cpu_ms_per_sample`, the training process with
    all its threads and worker processes, the step's own launches included), the best row's,
    with where it came from; None when there is none.

    What one GPU's training process really costs the CPU, where `gpu_loader_rate` counts DALI
    threads. It may overstate: a thread that waits for the GPU inside CUDA may spin, and its
    spinning counts."""
    best: tuple[float, str] | None = None
    for name, result in _gpu_results(results_dir, "end_to_end*.json"):
        for row in result["rows"]:
            ok = row.get("status") == "ok" and row.get("mode") == "pretrain"
            dali = str(row.get("pipeline", "")).startswith("dali-") and row.get("model") == "full"
            if ok and dali and row.get("cpu_ms_per_sample"):
                rate = 1000.0 / float(row["cpu_ms_per_sample"])
                if best is None or rate > best[0]:
                    pinned = row.get("pinned_cores")
                    how = f"pinned to {len(pinned)} cores" if pinned else "unpinned"
                    best = (
                        rate,
                        f"{name} ({row['pipeline']}, batch {row.get('batch_size')}, {how})",
                    )
    return best


def rank_host_memory(results_dir: str | os.PathLike | None) -> tuple[float, str] | None:
    """A training rank's host memory (MiB, its processes' proportional sum) at the longest list
    among `bench.startup` results in `results_dir` (with the loader phase, not smoke), with where it
    came from; None when there is none."""
    best: tuple[int, float, str] | None = None
    for name, result in _results(results_dir, "startup-*.json"):
        summary, config = result["summary"], result["config"]
        if config.get("smoke") or "rank_pss_mib" not in summary:
            continue
        if best is None or summary["entries"] > best[0]:
            source = (
                f"measured: {name}, a rank with {config.get('py_workers')} source workers "
                f"and a {summary['entries']}-clip list ({config.get('classes')} classes)"
            )
            best = (summary["entries"], float(summary["rank_pss_mib"]), source)
    return None if best is None else best[1:]


# ----------------------------------------------------------------------------------------------
# The worker (one process under torchrun)


def _raw_batches(loader) -> Iterator[dict[str, torch.Tensor]]:
    """The DALI pipeline's own outputs (before the loader's device stage), epoch after epoch."""
    while True:
        empty = True
        for outputs in loader.iterator:
            empty = False
            yield outputs[0]
        loader.iterator.reset()
        if empty:
            raise RuntimeError("the DALI pipeline yielded no batch in a whole epoch")


def pipeline_rate(loader, batches: int, warmup: int = 1) -> float:
    """Samples/s of a `DaliLoader`'s DALI pipeline alone (no device stage, no training step)."""
    source = _raw_batches(loader)
    for _ in range(warmup):
        next(source)
    samples = 0
    start = time.perf_counter()
    for _ in range(batches):
        samples += int(next(source)["wave"].shape[0])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def _rank_numbers(a: argparse.Namespace, info) -> dict[str, Any]:
    """This rank's measurements: its pipeline's rate alone, then timed DDP training steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.end_to_end import bench_config, forever, time_steps
    from bench.step import StepSetup, TrainStep
    from dali_pipelines.loader import build_loader
    from dali_pipelines.sources import Shard

    torch.set_num_threads(a.threads)
    device = info.device
    cfg = bench_config(
        Path(a.data),
        mode="pretrain",
        size="tiny",
        smoke=a.smoke,
        batch_size=a.batch_size,
        threads=a.threads,
        precision=default_precision(a.precision, device.type == "cuda"),
        seconds=a.seconds,
        layout=a.layout,
    )
    shard = Shard(info.rank, info.world_size)
    probe = build_loader(cfg, "train", "pretrain", shard, device)
    dist.barrier()  # every rank's pipeline runs at the same time, sharing the machine
    # Warm-up past the prefetch queue, which the pipeline filled ahead of the clock.
    pipeline = pipeline_rate(probe, a.pipeline_batches, warmup=cfg.data.prefetch + 1)
    del probe
    gc.collect()
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    setup = StepSetup.of("pretrain", cfg)
    step = TrainStep(setup, cfg, device)
    # The step runs what `net` is: the model under DDP, as the trainer wraps it.
    step.net = DistributedDataParallel(
        step.model, device_ids=[device.index] if device.type == "cuda" else None
    )
    loader = build_loader(cfg, "train", "pretrain", shard, device)
    batches = forever(loader)
    seen: list[int] = []  # the dataset indices of this rank's samples, in order

    def next_batch() -> dict[str, torch.Tensor]:
        batch = next(batches)
        seen.extend(batch["index"].tolist())
        return batch

    dist.barrier()
    timing = time_steps(step, next_batch, a.steps, a.warmup, device)
    # After DDP steps every replica holds the same weights, bit for bit.
    checksum = sum(p.detach().double().sum().item() for p in step.model.parameters())
    batches.close()
    return {
        "rank": info.rank,
        **timing,
        "first_epoch_indices": seen[: loader.steps_per_epoch * a.batch_size],
        "param_checksum": checksum,
        "pipeline_samples_per_s": pipeline,
        "threads": a.threads,
        "device": str(device),
        "backend": dist.get_backend(),
    }


def worker(a: argparse.Namespace) -> int:
    """One rank under torchrun: measure, then rank 0 writes every rank's numbers to `a.out` (a
    JSON list)."""
    import torch.distributed as dist

    from equiav.train.dist import destroy, init_distributed

    info = init_distributed(a.backend)
    try:
        row = _rank_numbers(a, info)
        # The pipelines and the DDP model are gone with their function; free them now, while
        # the process group still exists.
        gc.collect()
        rows: list[Any] = [None] * info.world_size
        dist.all_gather_object(rows, row)
        if info.is_main:
            Path(a.out).write_text(json.dumps(rows))
    finally:
        destroy()
    return 0


# ----------------------------------------------------------------------------------------------
# The launcher


def aggregate(k: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One result row from the `k` ranks' numbers."""
    if len(ranks) != k:
        raise ValueError(f"expected {k} ranks' numbers, got {len(ranks)}")
    slowest = max(r["seconds"] for r in ranks)
    per_process = [r["samples_per_s"] for r in ranks]
    pipeline = [r["pipeline_samples_per_s"] for r in ranks]
    threads = ranks[0]["threads"]
    shards = [set(r["first_epoch_indices"]) for r in ranks]
    return {
        "gpus": k,
        "processes": k,
        "mode": "pretrain",
        "status": "ok",
        "samples_per_s": sum(r["samples"] for r in ranks) / slowest,
        "per_process_samples_per_s": statistics.fmean(per_process),
        "per_process_samples_per_s_min": min(per_process),
        "data_wait_frac": statistics.fmean(r["data_wait_frac"] for r in ranks),
        "data_wait_frac_max": max(r["data_wait_frac"] for r in ranks),
        "step_ms": statistics.fmean(r["step_ms"] for r in ranks),
        "pipeline_samples_per_s_per_process": statistics.fmean(pipeline),
        "pipeline_samples_per_s_per_thread": statistics.fmean(pipeline) / threads,
        "threads_per_process": threads,
        # The mechanics: in its first epoch every rank read samples no other rank read, and
        # DDP kept the replicas identical.
        "shards_disjoint": len(set().union(*shards)) == sum(len(x) for x in shards),
        "replicas_in_sync": len({r["param_checksum"] for r in ranks}) == 1,
        "backend": ranks[0]["backend"],
        "device": ranks[0]["device"],
    }


def _worker_args(a: argparse.Namespace, out: Path) -> list[str]:
    args = [
        "--worker",
        "--out", str(out),
        "--data", str(Path(a.data).resolve()),
        "--seconds", str(a.seconds),
        "--layout", a.layout,
        "--batch-size", str(a.batch_size),
        "--steps", str(a.steps),
        "--warmup", str(a.warmup),
        "--threads", str(a.threads),
        "--pipeline-batches", str(a.pipeline_batches),
        "--backend", a.backend,
    ]  # fmt: skip
    if a.precision:
        args += ["--precision", a.precision]
    if a.smoke:
        args.append("--smoke")
    return args


def _kill_with_children(pid: int) -> None:
    """SIGKILL process `pid` and its child processes (torchrun starts each worker in a session
    of its own, so killing torchrun's process group would leave them running). Linux: the
    children are read from /proc."""
    children = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in tasks.read_text().split()]
        except OSError:
            continue
    for victim in [*children, pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(k: int, a: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run `k` workers under torchrun; -> the aggregated row, or a row with status "error"."""
    out = scratch / f"ranks-{k}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(k), "-m", "bench.scaling", *_worker_args(a, out),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(a.threads)
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even on a GPU machine
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        _kill_with_children(proc.pid)
        proc.communicate()
        return {"gpus": k, "status": "error", "error": f"timed out after {a.timeout} s"}
    launch_s = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        tail = (stderr or stdout)[-1500:]
        return {"gpus": k, "status": "error", "error": f"exit {proc.returncode}: {tail}"}
    row = aggregate(k, json.loads(out.read_text()))
    row["launch_s"] = round(launch_s, 2)
    return row


def _procs(a: argparse.Namespace) -> list[int]:
    if a.procs:
        procs = sorted({int(x) for x in a.procs.split(",") if x})
    else:
        procs = list(range(1, a.max_procs + 1))
    if not procs or procs[0] < 1:
        raise SystemExit(f"bench.scaling: process counts must be >= 1, got {procs}")
    return procs


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.scaling`."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--max-procs", type=int, default=torch.cuda.device_count() if cuda else 2)
    p.add_argument("--procs", default=None, help="explicit process counts, e.g. 1,2,4,8")
    p.add_argument("--smoke", action="store_true", help="tiny, fast run that checks the machinery")
    p.add_argument("--data", default="runs/bench-data", help="synthetic dataset folder")
    p.add_argument("--clips", type=int, default=96, help="clips to generate when --data is empty")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length of the dataset")
    p.add_argument("--layout", default="frames", choices=("frames", "webm"))
    p.add_argument("--batch-size", type=int, default=None, help="per process (default 16; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=None, help="DALI and torch threads per process")
    p.add_argument("--pipeline-batches", type=int, default=None, help="pipeline-alone batches")
    add_precision_argument(p)
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--timeout", type=int, default=600, help="seconds per torchrun launch")
    p.add_argument("--results-dir", default=None)
    cap = p.add_argument_group("capacity model")
    cap.add_argument("--per-gpu-samples-per-s", type=float, default=None)
    cap.add_argument("--dali-per-core", type=float, default=None, help="default: measured (k=1)")
    cap.add_argument("--gpus-per-node", type=int, default=8)
    cap.add_argument("--cores-per-node", type=int, default=16)
    cap.add_argument("--nodes", default="1,2,4,8")
    cap.add_argument("--real-frame-kb", type=float, default=ASSUMED_REAL_FRAME_BYTES / 1000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def _defaults(a: argparse.Namespace) -> argparse.Namespace:
    a.batch_size = a.batch_size or (2 if a.smoke else PAPER_BATCH_PER_GPU)
    a.steps = a.steps or (2 if a.smoke else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 2)
    a.threads = a.threads or (1 if a.smoke else 2)
    a.pipeline_batches = a.pipeline_batches or (2 if a.smoke else 10)
    return a


def _capacity(a: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The capacity model from this run's measurements and the stated inputs, with sources."""
    from bench.end_to_end import dataset_paths

    if a.per_gpu_samples_per_s:
        rate, rate_source = a.per_gpu_samples_per_s, "argument --per-gpu-samples-per-s"
    elif found := gpu_step_rate(a.results_dir):
        rate, rate_source = found[0], f"measured: {found[1]} (pretrain, paper batch)"
    else:
        rate = ESTIMATED_PER_GPU_SAMPLES_PER_S
        rate_source = "estimate: MEASURED.md, ViT-B pretrain step on an H100 at 45-50 % MFU"
    ok = [r for r in rows if r.get("status") == "ok"]
    per_core, core_source = a.dali_per_core, "argument --dali-per-core"
    if per_core is None and (found := gpu_training_cpu_rate(a.results_dir)):
        # The CPU a GPU's whole training process used, measured: the best evidence there is.
        per_core, core_source = found[0], f"measured CPU time on a GPU: {found[1]}"
    if per_core is None and (found := gpu_loader_rate(a.results_dir)):
        # A GPU node decodes and augments on its GPUs: the CPU's share is what a GPU run says.
        per_core, core_source = found[0], f"measured on a GPU: {found[1]}"
    if per_core is None and ok:
        first = min(ok, key=lambda r: r["gpus"])
        per_core = first["pipeline_samples_per_s_per_thread"]
        core_source = (
            f"measured here: the DALI pipeline alone with {first['threads_per_process']} "
            f"thread(s) at {first['gpus']} process(es), on {first['device']}"
        )
    train_json = dataset_paths(Path(a.data), a.layout)[0]
    media = {
        f"synthetic_{a.layout}": media_bytes_per_sample(train_json),
        "audioset_estimate": REAL_WAV_BYTES + 2 * a.real_frame_kb * 1000,
    }
    memory = rank_host_memory(a.results_dir)
    model = capacity_model(
        rate,
        media,
        host_mib_per_gpu=memory[0] if memory else None,
        dali_samples_per_s_per_core=per_core,
        gpus_per_node=a.gpus_per_node,
        cores_per_node=a.cores_per_node,
        nodes=[int(x) for x in a.nodes.split(",") if x],
    )
    model["sources"] = {
        "per_gpu_samples_per_s": rate_source,
        "dali_samples_per_s_per_core": core_source if per_core is not None else None,
        "host_mib_per_gpu": memory[1] if memory else None,
        f"synthetic_{a.layout}": f"measured: mean file sizes of {train_json}",
        "audioset_estimate": (
            f"10 s 16 kHz 16-bit wav ({REAL_WAV_BYTES} bytes) + 2 frames of "
            f"{a.real_frame_kb:g} kB (assumed)"
        ),
    }
    return model


def main(argv: Sequence[str] | None = None) -> int:
    a = _defaults(build_parser().parse_args(argv))
    if a.worker:
        if not a.out:
            raise SystemExit("bench.scaling --worker needs --out")
        return worker(a)

    from bench.common import write_result
    from bench.end_to_end import ensure_dataset

    procs = _procs(a)
    ensure_dataset(Path(a.data), a.clips, a.seconds, quiet=a.smoke)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        for k in procs:
            print(f"bench.scaling: {k} process(es)", flush=True)
            row = launch(k, a, Path(scratch))
            rows.append(row)
            if row["status"] == "ok":
                print(
                    f"  {row['samples_per_s']:.2f} samples/s in all, "
                    f"{row['per_process_samples_per_s']:.2f} per process, waiting "
                    f"{100 * row['data_wait_frac']:.0f} %, pipeline alone "
                    f"{row['pipeline_samples_per_s_per_process']:.1f} samples/s per process",
                    flush=True,
                )
            else:
                print(f"  failed: {row['error']}", flush=True)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        base = min(ok, key=lambda r: r["gpus"])
        for r in ok:
            r["scaling_efficiency"] = r["samples_per_s"] / (
                base["samples_per_s"] * r["gpus"] / base["gpus"]
            )
    device = "cuda" if a.device == "cuda" else "cpu"
    summary: dict[str, Any] = {
        "device": device,
        "launcher": "torchrun --standalone",
        "capacity": _capacity(a, rows),
    }
    cores = os.cpu_count() or 1
    if device == "cpu" or max(procs) * a.threads > cores:
        summary["note"] = (
            f"{max(procs)} process(es) x {a.threads} thread(s) on {cores} CPU core(s): the "
            "processes share the machine, so this checks the mechanics and the per-process "
            "input pipeline, not scaling"
        )
    payload = {
        "config": {
            "procs": procs,
            "smoke": a.smoke,
            "batch_size_per_process": a.batch_size,
            "steps": a.steps,
            "warmup_steps": a.warmup,
            "threads_per_process": a.threads,
            "pipeline_batches": a.pipeline_batches,
            "backend": a.backend,
            "device": a.device,
            "data": str(a.data),
            "layout": a.layout,
            "seconds": a.seconds,
            "model": "tiny",
        },
        "rows": rows,
        "summary": summary,
    }
    path = write_result("scaling-smoke" if a.smoke else "scaling", payload, a.results_dir)
    print(f"wrote {path}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
