"""Training checkpoints: atomic saves with rotation, the best checkpoint by a metric, finding the
one to resume from, loading with clear errors, gathering per-rank states, and RNG states.

Directory layout (`CheckpointManager`):

    ckpt-step00001234.pt   regular checkpoints; the last `keep_last` saved are kept
    ckpt-<tag>.pt          tagged checkpoints (e.g. "final"); kept outside the rotation
    best.pt                the checkpoint with the best metric so far
    checkpoints.json       the index: latest checkpoint, rotation order, best metric

Every file is written to a temporary file in the same directory (a name starting with "." and
ending in ".tmp"), fsynced and renamed over its final name with `os.replace`, so a crash leaves
either the previous file or the new one, never half of one; leftover temporary files are never
picked up and are removed when the next manager starts. A checkpoint file is one `torch.save`d
dict: `format`, `version`, `meta` (step, epoch, metric, tag, save time) and the caller's keys
(model, optimizer, schedule, scaler, loader and RNG states, ...). Everything in it should be
tensors and plain Python values, so that `load` can use `weights_only=True` (no code runs).

Distributed runs: call `gather_rank_states` on every rank for what differs per rank (loader
position, RNG states), then `save` on every rank; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from equiav.train.dist import get_rank, get_world_size

logger = logging.getLogger(__name__)

FORMAT = "equiav-checkpoint"
VERSION = 1
INDEX_FORMAT = "equiav-checkpoint-index"
INDEX_NAME = "checkpoints.json"
BEST_NAME = "best.pt"

_REGULAR = re.compile(r"^ckpt-step(\d+)\.pt$")
_TAGGED = re.compile(r"^ckpt-(?!step\d+\.pt$)([A-Za-z0-9_][A-Za-z0-9_.-]*)\.pt$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TEMP = re.compile(r"^\..*\.tmp$")
_RESERVED = ("format", "version", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or used; the message names the file and why."""


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------


def _temp_name(path: Path) -> Path:
    """A fresh temporary name beside `path` that scans never mistake for a checkpoint."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the OS lets us open directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temporary file in its directory: write, fsync, `os.replace`."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _atomic_link_or_copy(source: Path, path: Path) -> None:
    """Make `path` a copy of `source`, atomically: a hard link where the filesystem allows (no
    second write of the data; a later overwrite of `source` by rename does not affect it), else
    a byte copy."""
    tmp = _temp_name(path)
    try:
        os.link(source, tmp)
    except OSError:
        _atomic_write(path, lambda f: _copy_into(source, f))
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _copy_into(source: Path, f: IO[bytes]) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f, length=16 << 20)


# ---------------------------------------------------------------------------------------------
# Index and scanning
# ---------------------------------------------------------------------------------------------


def _read_index(directory: Path) -> dict[str, Any] | None:
    """The directory's index, or None when it is missing or unusable (then we scan)."""
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning(
            "%s: unreadable checkpoint index, scanning the directory instead: %s", path, e
        )
        return None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        logger.warning("%s: not a checkpoint index of ours, scanning the directory instead", path)
        return None
    return index


def _scan_regular(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every regular checkpoint file in `directory`, by step."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _REGULAR.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from in `directory`: the index's latest when that file exists;
    otherwise the regular checkpoint with the highest step, or the newest tagged one; None when
    there is none. Temporary files (a save cut short) and `best.pt` are never returned."""
    directory = Path(directory)
    index = _read_index(directory)
    if index is not None and isinstance(index.get("latest"), dict):
        path = directory / str(index["latest"].get("file", ""))
        if (_REGULAR.match(path.name) or _TAGGED.match(path.name)) and path.is_file():
            return path
    regular = _scan_regular(directory)
    if regular:
        return regular[-1][1]
    if directory.is_dir():
        tagged = [p for p in directory.iterdir() if _TAGGED.match(p.name) and p.is_file()]
        if tagged:
            return max(tagged, key=lambda p: p.stat().st_mtime)
    return None


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves training checkpoints into `directory`: keeps the last `keep_last` regular ones,
    tagged ones apart, and `best.pt` by `metric_mode` ("max": higher is better, "min": lower).

    Construct it and call `save` on every rank; only rank 0 creates the directory, writes files
    and keeps the index. A manager on a directory with an index continues its rotation and its
    best metric (a resumed run); files the index does not know (a crash between writing a
    checkpoint and the index) join the rotation as its oldest.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep_last: int = 3,
        metric_mode: Literal["max", "min"] = "max",
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1, got {keep_last}")
        if metric_mode not in ("max", "min"):
            raise ValueError(
                f"CheckpointManager: metric_mode must be 'max' or 'min', got {metric_mode!r}"
            )
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.metric_mode = metric_mode
        self.is_writer = get_rank() == 0
        self._rotation: list[str] = []  # regular checkpoint names, oldest save first
        self._best: dict[str, Any] | None = None  # {"metric", "step", "epoch", "source"}
        self._latest: dict[str, Any] | None = None
        if self.is_writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_temp_files()
            self._restore_index()

    # -- public ---------------------------------------------------------------------------------

    def save(
        self,
        state: dict[str, Any],
        step: int,
        epoch: int,
        metric: float | None = None,
        tag: str | None = None,
    ) -> Path:
        """Write `state` as the checkpoint of optimiser step `step` (file `ckpt-step%08d.pt`, or
        `ckpt-<tag>.pt` outside the rotation when `tag` is given) and return its path; copy it to
        `best.pt` when `metric` beats the best so far (NaN never does). Other ranks write
        nothing and get the same path back."""
        for key in _RESERVED:
            if key in state:
                raise ValueError(f"CheckpointManager.save: state key {key!r} is reserved")
        if tag is not None and not (_TAG.match(tag) and _TAGGED.match(f"ckpt-{tag}.pt")):
            raise ValueError(
                f"CheckpointManager.save: tag {tag!r} must be letters, digits, '_', '.', '-' "
                "and not of the form stepNNN"
            )
        name = f"ckpt-step{step:08d}.pt" if tag is None else f"ckpt-{tag}.pt"
        path = self.directory / name
        if not self.is_writer:
            return path

        meta = {"step": step, "epoch": epoch, "metric": metric, "tag": tag, "time": time.time()}
        payload = {"format": FORMAT, "version": VERSION, "meta": meta, **state}
        _atomic_write(path, lambda f: torch.save(payload, f))

        if metric is not None and self._is_better(metric):
            _atomic_link_or_copy(path, self.directory / BEST_NAME)
            self._best = {"metric": float(metric), "step": step, "epoch": epoch, "source": name}
        self._latest = {"file": name, "step": step, "epoch": epoch}
        pruned: list[str] = []
        if tag is None:
            if name in self._rotation:
                self._rotation.remove(name)
            self._rotation.append(name)
            while len(self._rotation) > self.keep_last:
                pruned.append(self._rotation.pop(0))
        # The index goes first and the deletions after: a crash in between leaves extra files,
        # never an index that points at a deleted one.
        self._write_index()
        for old in pruned:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / old).unlink()
        return path

    def latest(self) -> Path | None:
        """The checkpoint to resume from (see `latest_checkpoint`)."""
        return latest_checkpoint(self.directory)

    def best_path(self) -> Path | None:
        """`best.pt` if it exists."""
        path = self.directory / BEST_NAME
        return path if path.is_file() else None

    @property
    def best_metric(self) -> float | None:
        """The best metric saved so far (rank 0; None before the first metric)."""
        return None if self._best is None else self._best["metric"]

    # -- internals ------------------------------------------------------------------------------

    def _is_better(self, metric: float) -> bool:
        metric = float(metric)
        if math.isnan(metric):
            return False
        if self._best is None:
            return True
        best = self._best["metric"]
        return metric > best if self.metric_mode == "max" else metric < best

    def _remove_temp_files(self) -> None:
        for path in self.directory.iterdir():
            if _TEMP.match(path.name) and path.is_file():
                logger.info("%s: removing a temporary file left by an interrupted save", path)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _restore_index(self) -> None:
        index = _read_index(self.directory)
        on_disk = [p.name for _, p in _scan_regular(self.directory)]
        known = [n for n in (index or {}).get("regular", []) if n in on_disk]
        self._rotation = [n for n in on_disk if n not in known] + known
        if index is not None:
            if isinstance(index.get("latest"), dict):
                self._latest = index["latest"]
            best = index.get("best")
            if isinstance(best, dict) and (self.directory / BEST_NAME).is_file():
                if index.get("metric_mode") == self.metric_mode:
                    self._best = best
                else:
                    logger.warning(
                        "%s: best.pt was chosen with metric_mode=%s, now %s: starting the best "
                        "metric afresh",
                        self.directory,
                        index.get("metric_mode"),
                        self.metric_mode,
                    )
        elif (self.directory / BEST_NAME).is_file():
            # No index: read the best metric from best.pt itself (mmap: no full read).
            try:
                meta = load(self.directory / BEST_NAME, map_location="cpu", mmap=True)["meta"]
            except CheckpointError as e:
                logger.warning("ignoring the previous best checkpoint: %s", e)
                meta = {}
            if meta.get("metric") is not None:
                self._best = {
                    "metric": float(meta["metric"]),
                    "step": meta.get("step"),
                    "epoch": meta.get("epoch"),
                    "source": None,
                }

    def _write_index(self) -> None:
        index = {
            "format": INDEX_FORMAT,
            "version": VERSION,
            "metric_mode": self.metric_mode,
            "latest": self._latest,
            "regular": self._rotation,
            "best": self._best,
        }
        text = json.dumps(index, indent=1).encode()
        _atomic_write(self.directory / INDEX_NAME, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------
# Loading and resuming
# ---------------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
    mmap: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint written by `CheckpointManager.save`; the whole dict (`meta` and the
    caller's keys). Errors name the file: missing, unreadable or truncated, not one of ours, or
    of another format version. `weights_only=True` refuses pickled code objects; pass False
    only for files you trust that hold other Python objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path}: cannot read the checkpoint (truncated, corrupt or not a torch file): {e}"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an equiav training checkpoint (no format key {FORMAT!r}); model "
            "weights from elsewhere load through equiav.model.keymap"
        )
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {obj.get('version')!r}, this code reads "
            f"version {VERSION}"
        )
    return obj


def resolve_resume(resume: str | None, directory: str | os.PathLike) -> Path | None:
    """The checkpoint a run resumes from. None or "": none (a fresh start). "auto": the latest
    checkpoint in `directory`, or None when there is none. Anything else is a path that must
    exist: a checkpoint file, or a directory whose latest checkpoint is taken."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(directory)
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: resume directory holds no checkpoint")
        return found
    if not path.is_file():
        raise CheckpointError(f"{path}: resume checkpoint not found")
    return path


# ---------------------------------------------------------------------------------------------
# Per-rank states
# ---------------------------------------------------------------------------------------------


def gather_rank_states(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a process
    group. A collective: every rank must call it."""
    if not dist.is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, Any]:
    """This process's random number generator states: Python's `random`, NumPy's global
    generator, torch's CPU generator and, when CUDA is available, the current CUDA device's
    generator. Plain values and tensors only (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from `rng_state()` output. A saved CUDA state is restored on the
    current CUDA device when there is one (and skipped with a warning when there is none)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())  # a map_location may have moved it
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())
        else:
            logger.warning("the saved state has a CUDA RNG state but CUDA is not available")
