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

``read_dataset`` returns an ``EntryTable``: the list by column (strings in one buffer each,
labels as indices), a read-only sequence of ``Entry``. Every training process holds its list and
pickles it into each of DALI's spawned source workers, so for AudioSet-2M its size is per
process: as ``Entry`` objects 1.6 GB, as a table ~0.3 GB (``python -m bench.startup``).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    """Start offsets of consecutive pieces of ``lengths`` bytes, and the end: int32 while the
    buffer stays under 2 GiB (half the size of int64 offsets), else int64."""
    ends = np.cumsum(np.asarray(lengths, np.int64))
    wide = len(ends) and ends[-1] >= 2**31
    out = np.zeros(len(ends) + 1, np.int64 if wide else np.int32)
    out[1:] = ends
    return out


class _Strings:
    """Many strings in one UTF-8 buffer with offsets: two objects instead of one per string.

    Why: a 2M-clip list (AudioSet-2M) held as Python strings costs ~1.6 GB per process and is
    pickled string by string into every DALI worker process; as a buffer it is ~0.1 GB and
    pickles as a copy.
    """

    __slots__ = ("data", "offsets")

    def __init__(self, data: bytes, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets

    @classmethod
    def build(cls, values: Iterable[str]) -> _Strings:
        encoded = [v.encode("utf-8", "surrogatepass") for v in values]
        return cls(b"".join(encoded), _offsets([len(b) for b in encoded]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        o, data = self.offsets.tolist(), self.data
        for a, b in zip(o[:-1], o[1:], strict=True):
            yield data[a:b].decode("utf-8", "surrogatepass")

    def take(self, indices: np.ndarray) -> _Strings:
        o, data = self.offsets, self.data
        parts = [data[o[i] : o[i + 1]] for i in indices.tolist()]
        return _Strings(b"".join(parts), _offsets([len(b) for b in parts]))


class _Paths:
    """Paths as (folder, name): each distinct folder stored once, a folder code and the name
    per path. A list's media sit in a few folders (AudioSet's wavs in one), so this holds a
    path in its name's bytes plus 8; ``paths[i]`` is exactly the string that was stored."""

    __slots__ = ("folders", "codes", "names")

    def __init__(self, folders: tuple[str, ...], codes: np.ndarray, names: _Strings) -> None:
        self.folders, self.codes, self.names = folders, codes, names

    @classmethod
    def build(cls, values: Iterable[str]) -> _Paths:
        index: dict[str, int] = {}
        codes, names = [], []
        for v in values:
            cut = v.rfind("/") + 1  # the folder keeps its "/": folder + name == v
            codes.append(index.setdefault(v[:cut], len(index)))
            names.append(v[cut:])
        return cls(tuple(index), np.asarray(codes, np.int32), _Strings.build(names))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> str:
        return self.folders[self.codes[i]] + self.names[i]

    def __iter__(self) -> Iterator[str]:
        folders = self.folders
        for code, name in zip(self.codes.tolist(), self.names, strict=True):
            yield folders[code] + name

    def take(self, indices: np.ndarray) -> _Paths:
        return _Paths(self.folders, self.codes[indices], self.names.take(indices))


class EntryTable(Sequence[Entry]):
    """A dataset list stored by column; ``table[i]`` builds the ``Entry`` on demand.

    What ``read_dataset`` returns: a read-only sequence of entries that holds a 2M-clip list in
    ~0.2 GB (as ``Entry`` objects: ~1.6 GB) and pickles in a second, which matters because each
    training process keeps one and DALI's spawned workers each receive a pickled copy. Labels
    are kept as indices into the list's own label vocabulary (``vocabulary``, CSR rows:
    ``label_ptr``, ``label_ids``). Slicing and ``take`` give tables; ``+`` concatenates;
    equality is element-wise with any sequence of entries.
    """

    def __init__(
        self,
        video_ids: _Strings,
        wavs: _Paths,
        video_paths: _Paths,
        vocabulary: tuple[str, ...],
        label_ptr: np.ndarray,
        label_ids: np.ndarray,
    ) -> None:
        self.video_ids, self.wavs, self.video_paths = video_ids, wavs, video_paths
        self.vocabulary = vocabulary
        self.label_ptr, self.label_ids = label_ptr, label_ids

    @classmethod
    def from_columns(
        cls,
        video_ids: Sequence[str],
        wavs: Sequence[str],
        video_paths: Sequence[str],
        labels: Sequence[Sequence[str]],
    ) -> EntryTable:
        """A table of entry i = (video_ids[i], wavs[i], video_paths[i], labels[i])."""
        vocab: dict[str, int] = {}
        setdefault = vocab.setdefault
        ids = [setdefault(m, len(vocab)) for row in labels for m in row]
        return cls(
            _Strings.build(video_ids),
            _Paths.build(wavs),
            _Paths.build(video_paths),
            tuple(vocab),
            _offsets([len(row) for row in labels]),
            np.asarray(ids, np.int32),
        )

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> EntryTable:
        """A table of ``entries`` (any iterable of ``Entry``), in order."""
        entries = list(entries)
        return cls.from_columns(
            [e.video_id for e in entries],
            [e.wav for e in entries],
            [e.video_path for e in entries],
            [e.labels for e in entries],
        )

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i):  # int -> Entry, slice -> EntryTable
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"entry {i} out of range for {n} entries")
        i = int(i) % n
        vocab = self.vocabulary
        labels = self.label_ids[self.label_ptr[i] : self.label_ptr[i + 1]].tolist()
        return Entry(
            self.video_ids[i],
            self.wavs[i],
            self.video_paths[i],
            tuple(vocab[j] for j in labels),
        )

    def __iter__(self) -> Iterator[Entry]:
        for i in range(len(self)):
            yield self[i]

    def take(self, indices: Sequence[int] | np.ndarray) -> EntryTable:
        """The entries at ``indices`` (in that order) as a new table."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices out of range for {n} entries")
        idx = idx % n if n else idx
        starts, ends = self.label_ptr[idx], self.label_ptr[idx + 1]
        ptr = _offsets(ends - starts)
        # The label ids of the chosen rows, gathered without a Python loop.
        within = np.arange(ptr[-1]) - np.repeat(ptr[:-1], ends - starts)
        label_ids = self.label_ids[np.repeat(starts, ends - starts) + within]
        return EntryTable(
            self.video_ids.take(idx),
            self.wavs.take(idx),
            self.video_paths.take(idx),
            self.vocabulary,
            ptr,
            label_ids,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as plain arrays (``np.savez`` without pickle); ``from_arrays`` inverts it."""

        def strings(prefix: str, column: _Strings) -> dict[str, np.ndarray]:
            data = np.frombuffer(column.data, np.uint8)
            return {f"{prefix}_data": data, f"{prefix}_offsets": column.offsets}

        out = {"label_ptr": self.label_ptr, "label_ids": self.label_ids}
        out |= strings("ids", self.video_ids)
        out |= strings("vocabulary", _Strings.build(self.vocabulary))
        for name, paths in (("wavs", self.wavs), ("videos", self.video_paths)):
            out |= strings(f"{name}_names", paths.names)
            out |= strings(f"{name}_folders", _Strings.build(paths.folders))
            out[f"{name}_codes"] = paths.codes
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> EntryTable:
        """The table ``to_arrays`` wrote."""

        def strings(prefix: str) -> _Strings:
            data = np.asarray(arrays[f"{prefix}_data"], np.uint8).tobytes()
            return _Strings(data, np.asarray(arrays[f"{prefix}_offsets"]))

        def paths(name: str) -> _Paths:
            folders = tuple(strings(f"{name}_folders"))
            return _Paths(folders, np.asarray(arrays[f"{name}_codes"]), strings(f"{name}_names"))

        return cls(
            strings("ids"),
            paths("wavs"),
            paths("videos"),
            tuple(strings("vocabulary")),
            np.asarray(arrays["label_ptr"]),
            np.asarray(arrays["label_ids"]),
        )

    def __add__(self, other: Iterable[Entry]) -> EntryTable:
        return EntryTable.from_entries([*self, *other])

    def __radd__(self, other: Iterable[Entry]) -> EntryTable:
        return EntryTable.from_entries([*other, *self])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # a mutable-looking sequence: compare by value, never hash

    def __repr__(self) -> str:
        return f"EntryTable({len(self)} entries, {len(self.vocabulary)} distinct labels)"


@dataclass(frozen=True)
class LabelRows:
    """Every entry's labels as class indices of a ``LabelSet`` (CSR rows); ``row(i)`` is the
    multi-hot vector. A dense (entries x classes) float32 matrix would be 4.3 GB for
    AudioSet-2M's 527 classes, in every process that holds it; this is ~30 MB."""

    ptr: np.ndarray
    classes: np.ndarray
    num_classes: int

    @classmethod
    def build(cls, entries: Sequence[Entry], labels: LabelSet) -> LabelRows:
        """Map each entry's label ids through ``labels``; an id missing from it raises
        ``KeyError`` naming the entry and the id."""
        if not isinstance(entries, EntryTable):
            entries = EntryTable.from_entries(entries)
        ptr = entries.label_ptr
        lookup = np.array([labels.index.get(m, -1) for m in entries.vocabulary], np.int64)
        classes = lookup[entries.label_ids]
        bad = np.flatnonzero(classes < 0)
        if bad.size:
            row = int(np.searchsorted(ptr, bad[0], side="right")) - 1
            mid = entries.vocabulary[entries.label_ids[bad[0]]]
            raise KeyError(f"{entries[row].video_id}: label {mid!r} is not in the label set")
        width = np.int16 if len(labels) < 2**15 else np.int32
        return cls(ptr, classes.astype(width), len(labels))

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def row(self, i: int) -> np.ndarray:
        """Multi-hot float32 vector of entry ``i``."""
        out = np.zeros(self.num_classes, np.float32)
        out[self.classes[self.ptr[i] : self.ptr[i + 1]]] = 1.0
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


def _entry_error(json_path: Path, i: int, item: object, e: BaseException) -> DatasetError:
    """The error ``read_dataset`` raises for entry ``i``, naming the file, the entry and why."""
    where = f"{json_path}: entry {i}"
    if not isinstance(item, dict):
        return DatasetError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        return DatasetError(f"{where} ({item.get('video_id', '?')}): missing keys {missing}")
    try:
        parse_labels(item["labels"])
    except TypeError as err:
        return DatasetError(f"{where} ({item['video_id']}): {err}")
    return DatasetError(f"{where} ({item['video_id']}): {e}")


def _resolve(path: str, base: Path | str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def read_dataset(json_path: str | os.PathLike) -> EntryTable:
    """Read a dataset JSON into an ``EntryTable`` (a sequence of entries) with absolute media
    paths.

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
    items = doc["data"]
    ids, wavs, video_paths, label_lists = [], [], [], []
    # A 2M-clip list runs this loop 2M times: the checks are done by the exceptions they raise,
    # and paths are resolved only when relative.
    for i, item in enumerate(items):
        try:
            vid, wav, video, value = (
                item["video_id"],
                item["wav"],
                item["video_path"],
                item["labels"],
            )
            if value.__class__ is str:
                labels = [m for m in map(str.strip, value.split(",")) if m]
            else:
                labels = parse_labels(value)
        except (KeyError, TypeError, AttributeError) as e:
            raise _entry_error(json_path, i, item, e) from None
        ids.append(vid if vid.__class__ is str else str(vid))
        wav = wav if wav.__class__ is str else str(wav)
        video = video if video.__class__ is str else str(video)
        wavs.append(wav if wav.startswith("/") else _resolve(wav, base))
        video_paths.append(video if video.startswith("/") else _resolve(video, base))
        label_lists.append(labels)
    del doc, items  # the parsed JSON is the largest thing here: free it before building columns
    return EntryTable.from_columns(ids, wavs, video_paths, label_lists)


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
