"""Export retrieval embeddings of a dataset for your own work, and the loading of a trained model
from its checkpoint that `evaluate.py` shares.

    python -m equiav.embed --checkpoint CKPT --data DATA.json [--label-csv CSV] --out emb.npz \\
        [--set section.key=value ...]

CKPT is a pretraining checkpoint written by `train.py pretrain`. Every clip of DATA.json goes
through the eval pipeline (frame `eval.retrieval_frame`) and the model's `embed`; `emb.npz` holds
`video_ids` (N,) strings, `audio` and `visual` (N, D) float32: z_inv, L2-normalised, in the
order of the usable entries of DATA.json. Runs under `torchrun` too (rank 0 writes).

The run's configuration is the one saved in the checkpoint, with `--config` / `--set` applied on
top (e.g. `--set data.num_threads=8`, `--set data.clip_seconds=10`). Without `--label-csv` the
saved `data.label_csv` is used when it exists; retrieval never reads labels, so failing that a
label list is made from the labels DATA.json itself names.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from equiav.config import (
    Config,
    ConfigError,
    apply_overrides,
    count_labels,
    default_config,
    parse_args,
)
from equiav.data.index import DatasetError, read_dataset, write_label_csv
from equiav.model import EquiAVFinetune, EquiAVPretrain
from equiav.retrieval import embed_dataset, l2_normalize
from equiav.train import checkpoint as ckpt

log = logging.getLogger(__name__)

TASKS = ("pretrain", "finetune")


class UsageError(ValueError):
    """A command line that cannot run: a missing file or argument; the message says which."""


# What the command lines report as one line on stderr (exit status 2) instead of a traceback.
USER_ERRORS = (UsageError, ConfigError, DatasetError, ckpt.CheckpointError)


def load_trained(path: str, task: str, argv: Sequence[str] = ()) -> tuple[Config, dict[str, Any]]:
    """A `task` checkpoint's contents and its saved configuration with `argv` (`--config`,
    `--set`, paper flags) applied on top. Errors name the file."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    state = ckpt.load(path, map_location="cpu")
    if state.get("task") != task:
        hint = {"pretrain": "train.py pretrain", "finetune": "train.py finetune"}[task]
        raise ckpt.CheckpointError(
            f"{path}: a {state.get('task')!r} checkpoint; this needs a {task} checkpoint "
            f"(written by {hint})"
        )
    for key in ("model", "config"):
        if key not in state:
            raise ckpt.CheckpointError(f"{path}: the checkpoint has no {key!r} entry")
    base = apply_overrides(default_config(task), state["config"], source=f"{path} (saved config)")
    cfg, rest = parse_args(list(argv), base)
    if rest:
        raise UsageError(f"unrecognised arguments: {' '.join(rest)}")
    return cfg, state


def build_trained_model(cfg: Config, state: dict[str, Any], path: str) -> nn.Module:
    """The checkpoint's model (`EquiAVPretrain` or `EquiAVFinetune`) with its weights loaded."""
    weights = state["model"]
    if state["task"] == "pretrain":
        model: nn.Module = EquiAVPretrain(cfg.model, cfg.data)
    else:
        if "classifier.weight" not in weights:
            raise ckpt.CheckpointError(f"{path}: the finetuning checkpoint has no classifier")
        model = EquiAVFinetune(cfg.model, cfg.data, int(weights["classifier.weight"].shape[0]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ckpt.CheckpointError(
            f"{path}: the weights do not fit the model of the saved configuration: {e}"
        ) from e
    return model


def labels_from_dataset(json_path: str, out_csv: Path) -> Path:
    """Write a label CSV listing every label `json_path` names (first appearance order)."""
    mids: dict[str, None] = {}
    for entry in read_dataset(json_path):
        mids.update(dict.fromkeys(entry.labels))
    if not mids:
        mids["none"] = None
    write_label_csv(out_csv, list(mids), list(mids))
    return out_csv


def eval_data_config(
    cfg: Config,
    split: str,
    data: str | None,
    label_csv: str | None,
    stack: contextlib.ExitStack,
    frame: int | None = None,
    labels_needed: bool = True,
) -> Config:
    """`cfg` with `data.{split}_json`, `data.label_csv` and (if given) `data.eval_frame` set for
    an evaluation pass. Without `label_csv`, the saved one when it exists; when labels are not
    needed (retrieval), failing that, a label list made from the dataset in a temporary folder
    that `stack` removes."""
    data = data or getattr(cfg.data, f"{split}_json")
    if data is None:
        raise UsageError(f"no dataset: pass --data (the checkpoint's data.{split}_json is unset)")
    if not Path(data).is_file():
        raise UsageError(f"{data}: dataset file not found")
    if label_csv is None:
        saved = cfg.data.label_csv
        if saved is not None and Path(saved).is_file():
            label_csv = saved
        elif labels_needed:
            raise UsageError(
                f"no label CSV: pass --label-csv (the checkpoint's data.label_csv {saved!r} "
                "does not exist here)"
            )
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="equiav-")))
            label_csv = str(labels_from_dataset(data, folder / "class_labels_indices.csv"))
    elif not Path(label_csv).is_file():
        raise UsageError(f"{label_csv}: label CSV not found")
    changes: dict[str, Any] = {f"{split}_json": str(data), "label_csv": str(label_csv)}
    if frame is not None:
        changes["eval_frame"] = frame
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def check_label_count(model: nn.Module, label_csv: str) -> None:
    """A finetuned classifier must have one output per row of the label CSV."""
    if isinstance(model, EquiAVFinetune):
        n_model, n_csv = model.classifier.out_features, count_labels(label_csv)
        if n_model != n_csv:
            raise UsageError(
                f"{label_csv}: {n_csv} classes, but the checkpoint's classifier has {n_model}"
            )


def eval_precision(cfg: Config, device: torch.device) -> str:
    """The training precision on a GPU; float32 on the CPU, where bf16 autocast is slow."""
    return cfg.train.precision if device.type == "cuda" else "fp32"


def write_embeddings(path: str | Path, ids: Sequence[str], za: np.ndarray, zv: np.ndarray) -> Path:
    """`path` (.npz): `video_ids`, `audio` and `visual`, L2-normalised float32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        video_ids=np.asarray(list(ids), dtype=str),
        audio=l2_normalize(za).astype(np.float32),
        visual=l2_normalize(zv).astype(np.float32),
    )
    return path


def embed_checkpoint(
    cfg: Config, state: dict[str, Any], checkpoint: str, data: str, label_csv: str | None, dist
) -> tuple[Config, Any, list[str], Any, Any]:
    """Embed every clip of ``data`` with a pretraining checkpoint, as retrieval does (frame
    ``eval.retrieval_frame``, seeded ``cen_num`` vectors unless ``quirks.retrieval_seeded`` is
    off): -> (config used, loader, ids, z_inv audio, z_inv visual), gathered over the ranks."""
    from dali_pipelines.loader import build_loader
    from dali_pipelines.sources import Shard

    with contextlib.ExitStack() as stack:
        cfg = eval_data_config(
            cfg,
            "retrieval",
            data,
            label_csv,
            stack,
            frame=cfg.eval.retrieval_frame,
            labels_needed=False,
        )
        loader = build_loader(
            cfg, "retrieval", "eval", Shard(dist.rank, dist.world_size), dist.device
        )
    model = build_trained_model(cfg, state, checkpoint).to(dist.device)
    ids, za, zv = embed_dataset(
        model,
        loader,
        cfg,
        seeded=cfg.quirks.retrieval_seeded,
        precision=eval_precision(cfg, dist.device),
    )
    return cfg, loader, ids, za, zv


def main(argv: Sequence[str] | None = None) -> int:
    from equiav.train.dist import destroy, init_distributed

    parser = argparse.ArgumentParser(
        prog="python -m equiav.embed",
        description="Export z_inv embeddings (L2-normalised) of a dataset with a pretraining "
        "checkpoint. Also accepts --config FILE and --set section.key=value.",
    )
    parser.add_argument("--checkpoint", required=True, help="pretraining checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="dataset JSON to embed")
    parser.add_argument("--label-csv", help="class_labels_indices.csv (optional)")
    parser.add_argument("--out", required=True, help="output .npz")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg, state = load_trained(args.checkpoint, "pretrain", rest)
        dist = init_distributed(cfg.train.dist_backend)
        try:
            _, _, ids, za, zv = embed_checkpoint(
                cfg, state, args.checkpoint, args.data, args.label_csv, dist
            )
            if dist.is_main:
                path = write_embeddings(args.out, ids, za, zv)
                print(f"{path}: {len(ids)} clips, {za.shape[1]}-d audio and visual embeddings")
        finally:
            destroy()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
