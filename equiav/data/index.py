"""Typed, in-memory index of the dataset files the paper's code reads (no media is opened here).

Files (see ``shared/spec/EQUIAV.md`` "Data"):

- dataset JSON ``{"data": [{"video_id", "wav", "video_path", "labels"}, ...]}``; ``labels`` is a
  comma-separated string of label ids (a list is accepted too). Media paths may be absolute or
  relative; relative ones are resolved against the JSON file's folder.
- ``class_labels_indices.csv`` with the header ``index,mid,display_name``.
- ``weights.csv``: one class-balanced sampling weight per entry, in file order, no header.

``video_path`` is either a folder in the CAV-MAE frames layout
(``{video_path}/frame_{k}/{video_id}.jpg``) or a video file.

A media path may also name a member of a WebDataset tar shard (``equiav.data.shard``):
``{dir}/shard-000000.tar:{key}.wav``, ``...tar:{key}.webm`` (video layout) or ``...tar:{key}``
(frames layout, frame k being the member ``{key}.frame{k}.jpg``). ``equiav.data.media`` reads both.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VIDEO_FILE_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
REQUIRED_KEYS = ("video_id", "wav", "video_path", "labels")
# ``{shard}.tar:{member}``: the member's name has no folder part (``equiav.data.shard`` writes it).
_SHARD_MEMBER = re.compile(r"^(?P<tar>.+\.tar):(?P<member>[^/:]+)$")


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file (and the entry when known)."""


@dataclass(frozen=True)
class Entry:
    """One clip of a dataset list, with media paths resolved to absolute paths."""

    video_id: str
    wav: str
    video_path: str
    labels: tuple[str, ...]

    @property
    def is_video_file(self) -> bool:
        """True when ``video_path`` names a video file rather than a frames folder."""
        return is_video_file(self.video_path)

    def frame_path(self, k: int) -> str:
        """Path of frame ``k`` in the frames layout (only meaningful for frames folders)."""
        return frame_path(self.video_path, self.video_id, k)


@dataclass(frozen=True)
class LabelSet:
    """The label vocabulary of ``class_labels_indices.csv``: index i <-> mid <-> display name."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {m: i for i, m in enumerate(self.mids)})

    def __len__(self) -> int:
        return len(self.mids)

    def multi_hot(self, labels: Iterable[str]) -> np.ndarray:
        """Multi-hot float32 vector of ``labels``; an unknown id raises ``KeyError``."""
        out = np.zeros(len(self.mids), dtype=np.float32)
        for mid in labels:
            out[self.index[mid]] = 1.0
        return out


def is_video_file(path: str) -> bool:
    """A video file is named by its suffix; anything else is read as a frames folder."""
    return path.lower().endswith(VIDEO_FILE_SUFFIXES)


def shard_member(path: str) -> tuple[str, str] | None:
    """(tar file, member name) when ``path`` names a member of a tar shard, else None."""
    m = _SHARD_MEMBER.match(path)
    return (m["tar"], m["member"]) if m else None


def frame_path(video_path: str, video_id: str, k: int) -> str:
    """``{video_path}/frame_{k}/{video_id}.jpg``, the CAV-MAE frames layout; in a shard, the
    member ``{key}.frame{k}.jpg`` (``video_path`` then names ``{shard}.tar:{key}``)."""
    if shard_member(video_path) is not None:
        return f"{video_path}.frame{k}.jpg"
    return os.path.join(video_path, f"frame_{k}", f"{video_id}.jpg")


def parse_labels(value: object) -> tuple[str, ...]:
    """Labels as the paper's JSON stores them: ``"a,b,c"`` (or a list of ids)."""
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        raise TypeError(f"labels must be a string or list, got {type(value).__name__}")
    return tuple(p.strip() for p in parts if p.strip())


def _resolve(path: str, base: Path) -> str:
    return path if os.path.isabs(path) else os.path.normpath(str(base / path))


def read_dataset(json_path: str | os.PathLike) -> list[Entry]:
    """Read a dataset JSON into entries with absolute media paths.

    Raises ``DatasetError`` naming the file (and entry) on malformed JSON, a missing key or a
    label field of the wrong type. Duplicate ids and unknown labels are the checker's business.
    """
    json_path = Path(json_path)
    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: dataset file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DatasetError(f'{json_path}: expected an object with a "data" list')
    base = json_path.resolve().parent
    entries = []
    for i, item in enumerate(doc["data"]):
        where = f"{json_path}: entry {i}"
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in item]
        if missing:
            raise DatasetError(f"{where} ({item.get('video_id', '?')}): missing keys {missing}")
        try:
            labels = parse_labels(item["labels"])
        except TypeError as e:
            raise DatasetError(f"{where} ({item['video_id']}): {e}") from None
        entries.append(
            Entry(
                video_id=str(item["video_id"]),
                wav=_resolve(str(item["wav"]), base),
                video_path=_resolve(str(item["video_path"]), base),
                labels=labels,
            )
        )
    return entries


def write_dataset(
    json_path: str | os.PathLike, entries: Sequence[Entry], relative: bool = True
) -> None:
    """Write entries as the paper's JSON; paths relative to the JSON's folder when ``relative``.

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    json_path = Path(json_path)
    base = json_path.resolve().parent

    def rel(p: str) -> str:
        return os.path.relpath(p, base) if relative else p

    doc = {
        "data": [
            {
                "video_id": e.video_id,
                "wav": rel(e.wav),
                "video_path": rel(e.video_path),
                "labels": ",".join(e.labels),
            }
            for e in entries
        ]
    }
    _atomic_write(json_path, json.dumps(doc, indent=1) + "\n")


def read_label_csv(path: str | os.PathLike) -> LabelSet:
    """Read ``index,mid,display_name``; rows must be numbered 0..n-1 in order."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["index", "mid", "display_name"]:
        raise DatasetError(f"{path}: expected the header index,mid,display_name")
    mids, names = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 3:
            raise DatasetError(f"{path}:{line}: expected 3 columns, got {len(row)}")
        try:
            idx = int(row[0])
        except ValueError:
            raise DatasetError(f"{path}:{line}: index {row[0]!r} is not an integer") from None
        if idx != len(mids):
            raise DatasetError(f"{path}:{line}: index {idx} out of order (expected {len(mids)})")
        mids.append(row[1].strip())
        names.append(row[2].strip())
    if len(set(mids)) != len(mids):
        dup = [m for m, c in Counter(mids).items() if c > 1]
        raise DatasetError(f"{path}: duplicate label ids {dup[:5]}")
    return LabelSet(tuple(mids), tuple(names))


def write_label_csv(path: str | os.PathLike, mids: Sequence[str], names: Sequence[str]) -> None:
    """Write ``class_labels_indices.csv`` (display names are quoted, as AudioSet's are)."""
    lines = ["index,mid,display_name"]
    lines += [f'{i},{m},"{n}"' for i, (m, n) in enumerate(zip(mids, names, strict=True))]
    _atomic_write(Path(path), "\n".join(lines) + "\n")


def compute_weights(label_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """Class-balanced weights: w_l = 1000 / (count_l + 0.01), summed over a sample's labels."""
    counts = Counter(mid for labels in label_lists for mid in labels)
    per_label = {mid: 1000.0 / (c + 0.01) for mid, c in counts.items()}
    return np.array([sum(per_label[m] for m in labels) for labels in label_lists], np.float64)


def read_weights(path: str | os.PathLike, expected: int | None = None) -> np.ndarray:
    """Read ``weights.csv`` (one float per line); check its length against ``expected``."""
    path = Path(path)
    try:
        w = np.loadtxt(path, dtype=np.float64, delimiter=",", ndmin=1)
    except FileNotFoundError:
        raise DatasetError(f"{path}: weights file not found") from None
    except ValueError as e:
        raise DatasetError(f"{path}: not a column of numbers ({e})") from None
    if expected is not None and len(w) != expected:
        raise DatasetError(f"{path}: {len(w)} weights for {expected} dataset entries")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise DatasetError(f"{path}: weights must be finite and non-negative")
    return w


def write_weights(path: str | os.PathLike, weights: np.ndarray) -> None:
    """Write one weight per line in the format CAV-MAE's tools use (``%.18e``)."""
    _atomic_write(Path(path), "".join(f"{w:.18e}\n" for w in np.asarray(weights, np.float64)))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
