"""Evaluate trained EquiAV models (spec: 'Evaluation').

Classification, with a finetuning checkpoint::

    python evaluate.py --checkpoint CKPT --data test.json --label-csv CSV [--out DIR] \\
        [--set section.key=value ...]

runs the eval pipeline (frame `data.eval_frame`) and prints and writes `DIR/metrics.json` (mAP,
mean AUC, d-prime, accuracy, the excluded classes, sample counts) and `DIR/per_class.csv`.

Zero-shot retrieval, with a pretraining checkpoint::

    python evaluate.py retrieval --checkpoint CKPT --data retrieval.json [--label-csv CSV] \\
        [--out DIR] [--set ...]

embeds every clip (frame `eval.retrieval_frame`) and writes R@1/5/10 and the median rank in both
directions to `DIR/retrieval.json` and each query's ten best items to `DIR/retrieval_top10.csv`.

The configuration is the one saved in the checkpoint, with `--config` / `--set` applied on top.
`--data` and `--label-csv` default to the saved `data.test_json` / `data.retrieval_json` and
`data.label_csv`; `--out` defaults to `eval-<checkpoint name>` beside the checkpoint. Both run
under `torchrun` too: every rank evaluates its shard, the rows are gathered so that each sample
counts exactly once, and rank 0 writes.

`evaluate_model` is the per-epoch validation of finetuning (`train.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from equiav.embed import (
    USER_ERRORS,
    build_trained_model,
    check_label_count,
    embed_checkpoint,
    eval_data_config,
    eval_precision,
    load_trained,
)
from equiav.metrics import evaluate_scores, gather_indexed
from equiav.retrieval import DIRECTIONS, retrieval_metrics, similarity, top_k_table
from equiav.train.dist import DistInfo, destroy, init_distributed
from equiav.train.optim import autocast

log = logging.getLogger("evaluate")

# The scalar results a training run logs per evaluation (the rest is the full report).
SCALARS = (
    "mAP",
    "mean_auc",
    "d_prime",
    "accuracy",
    "n_samples",
    "n_classes_scored",
    "excluded_classes",
)


def predict(
    model: nn.Module, loader, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entry index (N,), scores (N, C) float32 logits, targets (N, C)) of every sample of an
    eval-mode `loader`, gathered from every rank in entry order (a collective under
    torch.distributed). The model is in eval mode meanwhile and put back as it was."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices, scores, targets = [], [], []
    try:
        with torch.no_grad():
            for batch in loader:
                if len(batch["index"]) == 0:  # a last batch of padding rows only
                    continue
                with autocast(precision, device):
                    logits = model(batch["audio"], batch["visual"])
                indices.append(batch["index"].cpu().numpy())
                scores.append(logits.float().cpu().numpy())
                targets.append(batch["labels"].float().cpu().numpy())
    finally:
        model.train(was_training)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    index, (scores_all, targets_all) = gather_indexed(cat(indices), cat(scores), cat(targets))
    if len(index) == 0:
        raise RuntimeError("the evaluation loader yielded no sample")
    return index, scores_all, targets_all


def evaluation_report(
    model: nn.Module,
    loader,
    label_names: Sequence[str],
    metric: str = "mAP",
    precision: str = "fp32",
) -> dict[str, Any]:
    """`equiav.metrics.evaluate_scores` of the model on every sample of `loader`, plus
    ``metric_name`` / ``metric`` (the selection metric), ``n_entries`` (the usable entries) and
    ``skipped`` (entries that broke while reading, on this rank). The same on every rank."""
    if metric not in ("mAP", "accuracy"):
        raise ValueError(f"metric must be 'mAP' or 'accuracy', got {metric!r}")
    index, scores, targets = predict(model, loader, precision)
    report = evaluate_scores(scores, targets, label_names)
    report["metric_name"] = metric
    report["metric"] = report[metric]
    report["n_entries"] = len(loader.entries)
    report["skipped"] = sorted(loader.skipped)
    return report


def evaluate_model(
    model: nn.Module,
    loader,
    label_names: Sequence[str],
    dist: DistInfo | None = None,
    metric: str = "mAP",
    precision: str = "fp32",
) -> dict[str, float]:
    """The per-epoch validation of finetuning: scalar metrics of `model` on an eval-mode
    `loader` (mAP, mean AUC, d-prime, accuracy, counts) with the selection metric (`metric`,
    i.e. `cfg.data.resolved_metric()`) under ``"metric"``. Call it on every rank (`dist`: this
    process; the results are gathered and equal on every rank)."""
    if dist is not None and dist.world_size > 1 and not torch.distributed.is_initialized():
        raise RuntimeError(f"world size {dist.world_size} but no process group is initialised")
    report = evaluation_report(model, loader, label_names, metric, precision)
    out = {key: float(report[key]) for key in SCALARS}
    out["metric"] = float(report["metric"])
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _json_value(x: Any) -> Any:
    """NaN as null (strict JSON); infinities stay (Python's json reads them back)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_value(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_value(v) for v in x]
    return x


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_value(data), indent=1) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


def run_classification(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """Load a finetuning checkpoint, evaluate it on `args.data`, write the files (rank 0)."""
    from dali_pipelines.loader import build_loader
    from dali_pipelines.sources import Shard

    cfg, state = load_trained(args.checkpoint, "finetune", rest)
    with contextlib.ExitStack() as stack:
        cfg = eval_data_config(cfg, "test", args.data, args.label_csv, stack)
    model = build_trained_model(cfg, state, args.checkpoint)
    check_label_count(model, cfg.data.label_csv)
    dist = init_distributed(cfg.train.dist_backend)
    try:
        loader = build_loader(cfg, "test", "eval", Shard(dist.rank, dist.world_size), dist.device)
        report = evaluation_report(
            model.to(dist.device),
            loader,
            loader.labels.names,
            cfg.data.resolved_metric(),
            eval_precision(cfg, dist.device),
        )
        per_class = report.pop("per_class")
        summary = {
            "checkpoint": str(args.checkpoint),
            "data": cfg.data.test_json,
            "label_csv": cfg.data.label_csv,
            "eval_frame": cfg.data.eval_frame,
            "world_size": dist.world_size,
            **report,
        }
        if dist.is_main:
            out = Path(args.out)
            write_json(out / "metrics.json", summary)
            write_csv(
                out / "per_class.csv",
                per_class,
                ("index", "name", "ap", "auc", "positives", "scored"),
            )
            print(json.dumps(_json_value({k: v for k, v in summary.items() if k != "excluded"})))
            print(f"wrote {out / 'metrics.json'} and {out / 'per_class.csv'}")
    finally:
        destroy()
    return summary


def run_retrieval(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """Load a pretraining checkpoint, run zero-shot retrieval on `args.data`, write the files."""

    cfg, state = load_trained(args.checkpoint, "pretrain", rest)
    dist = init_distributed(cfg.train.dist_backend)
    try:
        cfg, loader, ids, za, zv = embed_checkpoint(
            cfg, state, args.checkpoint, args.data, args.label_csv, dist
        )
        seeded = cfg.quirks.retrieval_seeded
        results = {
            "checkpoint": str(args.checkpoint),
            "data": cfg.data.retrieval_json,
            "frame": cfg.data.eval_frame,
            "seeded": seeded,
            "seed": cfg.eval.retrieval_seed if seeded else None,
            "cen_num": cfg.model.cen_num if cfg.model.cen_mean else 0,
            "world_size": dist.world_size,
            "skipped": sorted(loader.skipped),
            **retrieval_metrics(za, zv, cfg.eval.retrieval_ks),
        }
        if dist.is_main:
            out = Path(args.out)
            sim = similarity(za, zv)
            rows = top_k_table(sim, ids, 10, DIRECTIONS[0]) + top_k_table(
                sim.T, ids, 10, DIRECTIONS[1]
            )
            k = min(10, len(ids))
            fields = ["query", "direction", "rank"] + [f"top_{j + 1}" for j in range(k)]
            write_json(out / "retrieval.json", results)
            write_csv(out / "retrieval_top10.csv", rows, fields)
            for direction in DIRECTIONS:
                values = "  ".join(f"{name} {v:.4g}" for name, v in results[direction].items())
                print(f"{direction}: {values}")
            print(f"wrote {out / 'retrieval.json'} and {out / 'retrieval_top10.csv'}")
    finally:
        destroy()
    return results


def parse_command_line(argv: Sequence[str]) -> tuple[str, argparse.Namespace, list[str]]:
    """(mode, our arguments, the config arguments left for `parse_args`)."""
    argv = list(argv)
    mode = "retrieval" if argv[:1] == ["retrieval"] else "classification"
    if mode == "retrieval":
        argv.pop(0)
    what = {
        "classification": "Classification metrics (mAP, AUC, d-prime, accuracy) of a finetuning "
        "checkpoint; `evaluate.py retrieval --help` for zero-shot retrieval.",
        "retrieval": "Zero-shot audio-visual retrieval (R@1/5/10, median rank) of a pretraining "
        "checkpoint.",
    }[mode]
    parser = argparse.ArgumentParser(
        prog="evaluate.py" + (" retrieval" if mode == "retrieval" else ""),
        description=f"{what} Also accepts --config FILE and --set section.key=value (applied "
        "to the checkpoint's saved configuration).",
    )
    task = "pretraining" if mode == "retrieval" else "finetuning"
    parser.add_argument("--checkpoint", required=True, help=f"{task} checkpoint (.pt)")
    parser.add_argument("--data", help="dataset JSON (default: the saved config's)")
    parser.add_argument("--label-csv", help="class_labels_indices.csv (default: the saved one)")
    parser.add_argument("--out", help="output folder (default: eval-<checkpoint> beside it)")
    args, rest = parser.parse_known_args(argv)
    if args.out is None:
        path = Path(args.checkpoint)
        args.out = str(path.parent / f"eval-{path.stem}")
    return mode, args, rest


def main(argv: Sequence[str] | None = None) -> int:
    mode, args, rest = parse_command_line(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if mode == "retrieval":
            run_retrieval(args, rest)
        else:
            run_classification(args, rest)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
