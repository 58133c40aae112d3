"""``make demo``: the project end to end on the embedded synthetic dataset (``configs/demo.yaml``).

Stages, each printed with its wall time:

1. generate the synthetic audio-visual dataset (real .wav, VP9 .webm and JPEG frames) under the
   config's data folder, unless the same one is already there;
2. check it with the dataset checker (cached);
3. feed it through the DALI pipelines (training order with sharding and the eval pass) in both
   visual layouts, and report samples per second;

and writes a summary JSON to ``{train.save_path}/demo_summary.json``. Pretraining, finetuning,
evaluation and retrieval join this sequence as they land (see the README's status section).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from equiav.config import parse_args, resolve

log = logging.getLogger("equiav.demo")


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def ensure_dataset(data_dir: Path, clips: int, classes: int, seed: int, seconds: float) -> dict:
    """Generate the demo dataset unless ``data_dir`` already holds this exact one."""
    from equiav.data.synth import generate

    wanted = {
        "clips": clips,
        "classes": classes,
        "seed": seed,
        "seconds": seconds,
        "formats": ["webm", "frames"],
    }
    stamp = data_dir / "demo_dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"{data_dir}: already generated ({clips} clips)")
        return wanted
    info = generate(
        data_dir,
        clips=clips,
        classes=classes,
        seed=seed,
        multi_label=True,
        video_format=("webm", "frames"),
        seconds=seconds,
        progress=True,
    )
    stamp.write_text(json.dumps(wanted))
    print(f"{data_dir}: {info.num_train} train + {info.num_test} test clips, {classes} classes")
    return wanted


def loader_throughput(cfg, json_name: str, mode: str, device: torch.device) -> dict:
    """One epoch of the DALI loader over ``json_name``: batches, samples and samples/s."""
    import dataclasses

    from dali_pipelines.loader import build_loader

    data_dir = Path(cfg.data.train_json).parent
    split = "train" if mode == "train" else "test"
    data = dataclasses.replace(cfg.data, **{f"{split}_json": str(data_dir / json_name)})
    loader = build_loader(dataclasses.replace(cfg, data=data), split, mode, device=device)
    start, samples, batches = time.perf_counter(), 0, 0
    for batch in loader:
        samples += len(batch["index"])
        batches += 1
    seconds = time.perf_counter() - start
    result = {
        "list": json_name,
        "mode": mode,
        "batches": batches,
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "skipped_mid_run": len(loader.skipped),
    }
    print(
        f"{json_name:>16} {mode:>5}: {samples} samples in {seconds:.2f} s "
        f"({samples / seconds:.1f} samples/s, batch {loader.cfg.batch_size})"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    cfg, rest = parse_args(argv)
    parser = argparse.ArgumentParser(description="EquiAV demo on the synthetic dataset")
    parser.add_argument("--clips", type=int, default=200, help="synthetic clips (train + test)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--data-seed", type=int, default=0)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if cfg.data.train_json is None:
        print("error: the demo config must set data.train_json", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary: dict = {"device": str(device), "torch": torch.__version__}
    total = time.perf_counter()

    t = _stage("1/3 synthetic dataset")
    data_dir = Path(cfg.data.train_json).parent
    summary["dataset"] = ensure_dataset(
        data_dir, args.clips, args.classes, args.data_seed, cfg.data.clip_seconds
    )
    summary["dataset_s"] = round(time.perf_counter() - t, 1)
    cfg = resolve(cfg)

    t = _stage("2/3 dataset check")
    from equiav.data.check import check_dataset

    for name in ("train.json", "test.json", "train_webm.json", "test_webm.json"):
        report = check_dataset(
            data_dir / name,
            cfg.data.label_csv,
            seconds=cfg.data.clip_seconds,
            frames_per_clip=cfg.data.frames_per_clip,
            progress=False,
        )
        print(
            f"{name:>16}: {len(report.entries)} entries, {len(report.errors())} errors, "
            f"{len(report.warnings())} warnings"
        )
    summary["check_s"] = round(time.perf_counter() - t, 1)

    t = _stage("3/3 DALI input pipelines")
    summary["loader"] = [
        loader_throughput(cfg, name, mode, device)
        for name, mode in (
            ("train.json", "train"),
            ("test.json", "eval"),
            ("train_webm.json", "train"),
            ("test_webm.json", "eval"),
        )
    ]
    summary["loader_s"] = round(time.perf_counter() - t, 1)

    summary["total_s"] = round(time.perf_counter() - total, 1)
    out = Path(cfg.train.save_path)
    os.makedirs(out, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\ndone in {summary['total_s']} s; summary in {out / 'demo_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
