"""Which host synchronisations happen in DALI-fed training steps (torch's sync debug mode)."""

import sys
import warnings
from pathlib import Path

import torch

from bench.end_to_end import bench_config, forever
from bench.step import StepSetup, TrainStep
from dali_pipelines.loader import build_loader

if __name__ == "__main__":
    mode = sys.argv[1]
    cfg = bench_config(
        Path("runs/bench-data"),
        mode=mode,
        size="tiny",
        smoke=False,
        batch_size=16,
        threads=2,
        precision="bf16",
        seconds=10.0,
        py_workers=2,
    )
    dev = torch.device("cuda")
    step = TrainStep(StepSetup(mode, "bf16", True, False), cfg, dev)
    batches = forever(build_loader(cfg, "train", mode, device=dev))
    for _ in range(3):
        step(next(batches))
    torch.cuda.synchronize()
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    for i in range(2):
        print("--- next batch", i, flush=True)
        b = next(batches)
        print("--- step", i, flush=True)
        step(b)
    torch.cuda.set_sync_debug_mode("default")
    print("--- done", flush=True)
    batches.close()
