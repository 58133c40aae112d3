"""Dataset checker: finds the dataset entries that would break training or silently change it.

Run it before training (``python -m equiav.data.check DATA.json --label-csv CSV``) or call
:func:`check_dataset` from the loader. It reports

- errors (the entry cannot be used): ``missing_media``, ``unreadable_media``, ``missing_frames``,
  ``unknown_label``, ``duplicate_id`` (every occurrence after the first), ``empty_labels`` and, in
  ``--deep`` mode, ``corrupt_media`` (data the headers do not show to be broken: a truncated wav
  data chunk, NaN/Inf samples, a video that decodes well short of its declared duration, a JPEG
  that fails to decode);
- warnings (the pipeline repairs these): ``sample_rate`` (resampled), ``multichannel``
  (downmixed), ``short_audio`` (padded), ``silent_audio`` (deep only: all samples zero) and
  ``cpu_undecodable``: a video codec that DALI's CPU decoder cannot decode (only VP8, VP9 and
  MJPEG decode on the CPU; H.264, HEVC, MPEG-4 and AV1 need NVDEC). A loader running without a GPU
  turns it into an error with ``report.promote("cpu_undecodable")`` (CLI: ``--cpu-only``).

Fast mode reads headers only (wav: ``soundfile.info``; video file: container open and a video
stream via PyAV; frames folder: every ``frame_{k}/{id}.jpg`` for k < frames_per_clip opened with
PIL without decoding). ``--deep`` decodes everything. Label, duplicate and empty-label issues
name the dataset JSON as their file; media issues name the media file (or frames folder).
Media may be files or members of WebDataset shards (``equiav.data.shard``): both are read through
``equiav.data.media``, a member being named ``shard.tar:member`` and stamped with its shard's
mtime and its own size.

Media are checked in chunks by a pool of spawned worker processes (``workers``, default one per
core): parsing headers with soundfile, PIL and PyAV is Python and C work under the GIL (~60 us
per wav or JPEG, ~1 ms per video file on one core), which threads would keep on one core. A
list of one chunk is checked in-process. As with any spawn pool, a script calling
:func:`check_dataset` needs the ``if __name__ == "__main__":`` guard.

Results are cached per dataset file, mode and parameters in
``{json_dir}/.equiav-cache/check-{json_stem}-{hash}.json`` (else ``$XDG_CACHE_HOME/equiav`` or
``~/.cache/equiav``). The cache holds the JSON's and the label CSV's (path, size, mtime) and per
entry a stamp of the (size, mtime_ns) of every media file it read; a re-run with the same JSON
stats the media files and re-checks only the entries whose stamp changed. Label and duplicate
checks are cheap and always run afresh. The parsed list itself is cached beside it
(``entries-{json_stem}-{hash}.npz``, plain arrays keyed by the JSON's path, size and mtime), so
that a long list is parsed once, not by every rank of every run.

``--write-clean OUT.json`` writes the entries without errors (warnings kept) and their weights
(see :func:`write_clean`). Exit codes: 0 clean, 1 errors (or warnings with ``--strict``), 2 the
dataset, label or weights file cannot be read at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import struct
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from equiav.data.index import (
    DatasetError,
    Entry,
    EntryTable,
    LabelSet,
    compute_weights,
    read_dataset,
    read_label_csv,
    read_weights,
    shard_member,
    write_dataset,
    write_weights,
)
from equiav.data.media import store

ERROR = "error"
WARNING = "warning"

# Codecs DALI's CPU video decoder handles (measured, shared/spec/MEASURED.md); names as FFmpeg
# reports them, including the libvpx decoder names in case a build prefers those.
CPU_DECODABLE_CODECS = frozenset({"vp8", "vp9", "mjpeg", "libvpx", "libvpx-vp9"})
# A deep-decoded video may end this much before its declared duration (last-frame rounding,
# an audio track slightly longer than the video) before it counts as truncated.
VIDEO_DURATION_SLACK_S = 0.5
CACHE_FORMAT = 1
ENTRIES_CACHE_FORMAT = 1
# Entries per pool task: enough to amortise pickling and scheduling, few enough for the bar.
# Deep checks take ~100x longer per entry; a stat takes microseconds, so lists up to CHUNK_STAT
# entries are stat-ed in-process, where starting a pool would cost more than it saves.
CHUNK = 256
CHUNK_DEEP = 16
CHUNK_STAT = 4096

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding: ``severity`` is "error" or "warning"; ``file`` is the file it is about."""

    severity: str
    kind: str
    index: int
    video_id: str
    file: str
    message: str

    def format(self) -> str:
        """The one-line form the CLI prints."""
        return (
            f"{self.severity.upper()} {self.kind} video_id={self.video_id} "
            f"file={self.file}: {self.message}"
        )


@dataclass(frozen=True, slots=True)
class _Params:
    """What the media checks depend on (part of the cache key)."""

    seconds: float
    sample_rate: int
    frames_per_clip: int
    deep: bool


# Media check of one entry: (stamp, findings (severity, kind, file, message), audio facts, codec).
_Found = tuple[str, str, str, str]
_Audio = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class _Result:
    stamp: str
    found: tuple[_Found, ...]
    audio: _Audio | None
    codec: str | None


@dataclass
class CheckReport:
    """Everything the checker found about one dataset JSON.

    ``entries`` are all entries in file order; ``issues`` are ordered by entry index;
    ``usable`` lists the indices of entries without errors. ``audio_info[i]`` is
    (sample_rate, channels, frames) of entry i's wav (None when unreadable); ``video_codec[i]``
    the FFmpeg codec name of its video file (None for frames folders or unreadable files).
    ``from_cache_count`` entries took their media results from the cache; ``checked_count``
    entries were read now.
    """

    json_path: str
    label_csv: str | None
    deep: bool
    entries: EntryTable
    issues: list[Issue]
    audio_info: list[_Audio | None]
    video_codec: list[str | None]
    weights: np.ndarray | None = None
    from_cache_count: int = 0
    checked_count: int = 0
    cache_path: str | None = None
    usable: list[int] = field(init=False)

    def __post_init__(self) -> None:
        bad = {i.index for i in self.issues if i.severity == ERROR}
        self.usable = [i for i in range(len(self.entries)) if i not in bad]

    def errors(self) -> list[Issue]:
        """The issues that make an entry unusable."""
        return [i for i in self.issues if i.severity == ERROR]

    def warnings(self) -> list[Issue]:
        """The issues the pipeline repairs (or, for ``cpu_undecodable``, a GPU decodes)."""
        return [i for i in self.issues if i.severity == WARNING]

    def counts(self) -> dict[str, int]:
        """Number of issues per kind, errors first, then by kind name."""
        c = Counter((i.severity != ERROR, i.kind) for i in self.issues)
        return {kind: n for (_, kind), n in sorted(c.items())}

    def clean_entries(self) -> EntryTable:
        """The usable entries, in file order."""
        return self.entries.take(self.usable)

    def clean_weights(self) -> np.ndarray:
        """Weights of the usable entries: the given weights' rows, else recomputed over them."""
        if self.weights is not None:
            return self.weights[self.usable]
        return compute_weights([e.labels for e in self.clean_entries()])

    def promote(self, *kinds: str) -> CheckReport:
        """A copy in which warnings of ``kinds`` are errors (e.g. ``cpu_undecodable`` on a CPU)."""
        issues = [
            dataclasses.replace(i, severity=ERROR) if i.kind in kinds else i for i in self.issues
        ]
        return dataclasses.replace(self, issues=issues)

    def summary(self) -> str:
        """Grouped counts, one paragraph."""

        def group(items: list[Issue]) -> str:
            c = Counter(i.kind for i in items)
            inner = ", ".join(f"{k} {n}" for k, n in sorted(c.items()))
            return f"{len(items)}" + (f" ({inner})" if inner else "")

        mode = "deep" if self.deep else "fast"
        return (
            f"{self.json_path}: {len(self.entries)} entries, {len(self.usable)} usable ({mode} "
            f"check, {self.from_cache_count} from cache, {self.checked_count} read)\n"
            f"errors: {group(self.errors())}\n"
            f"warnings: {group(self.warnings())}"
        )

    def to_dict(self) -> dict:
        """JSON-ready form of the report (all issues, uncapped)."""
        return {
            "dataset": self.json_path,
            "label_csv": self.label_csv,
            "mode": "deep" if self.deep else "fast",
            "entries": len(self.entries),
            "usable": len(self.usable),
            "from_cache": self.from_cache_count,
            "counts": self.counts(),
            "issues": [dataclasses.asdict(i) for i in self.issues],
        }


# ---------------------------------------------------------------------------------------------
# Per-entry media checks (run in worker processes; they never raise on a bad file)


def _media_files(entry: Entry, frames_per_clip: int) -> list[str]:
    """Files whose (size, mtime) stamp an entry's result: the wav, then the video file or frames."""
    if entry.is_video_file:
        return [entry.wav, entry.video_path]
    return [entry.wav] + [entry.frame_path(k) for k in range(frames_per_clip)]


def _stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns), or None when the file (or shard member) does not exist; (-1, -1) when
    stat itself fails (or a shard cannot be indexed: reading it then names the problem)."""
    try:
        return store().stat(path)
    except (OSError, ValueError):
        return (-1, -1)


def _stamp(stats: Sequence[tuple[int, int] | None]) -> str:
    text = ";".join("-" if s is None else f"{s[0]}:{s[1]}" for s in stats)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _err(kind: str, path: str, msg: str) -> _Found:
    return (ERROR, kind, path, msg)


def _warn(kind: str, path: str, msg: str) -> _Found:
    return (WARNING, kind, path, msg)


def _wav_data_chunk(path: str) -> tuple[int, int] | None:
    """(offset, declared size) of a RIFF/WAVE data chunk; None for other formats or streams."""
    with store().open_binary(path) as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            hdr = f.read(8)
            if len(hdr) < 8:
                return None
            cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
            if cid == b"data":
                # 0 and 0xFFFFFFFF are what streaming writers leave when they cannot seek back.
                return None if size in (0, 0xFFFFFFFF) else (f.tell(), size)
            f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even sizes


def _check_wav(path: str, p: _Params) -> tuple[list[_Found], _Audio | None]:
    import soundfile as sf

    try:
        info = sf.info(store().open(path))
    except Exception as e:  # any failure to parse the header means the file is unusable
        return [_err("unreadable_media", path, f"cannot read audio header ({_describe(e)})")], None
    sr, ch, n = int(info.samplerate), int(info.channels), int(info.frames)
    if n <= 0 or sr <= 0:
        return [_err("unreadable_media", path, f"no audio samples ({n} at {sr} Hz)")], None
    found: list[_Found] = []
    if p.deep:
        # libsndfile clamps a truncated data chunk to the bytes present, so compare the
        # header's declared size with the file size ourselves.
        try:
            chunk = _wav_data_chunk(path)
            if chunk is not None and (have := store().stat(path)[0] - chunk[0]) < chunk[1]:
                msg = f"data chunk declares {chunk[1]} bytes, the file holds {have}"
                found.append(_err("corrupt_media", path, msg))
            data, _ = sf.read(store().open(path), dtype="float32", always_2d=True)
        except Exception as e:  # a decode failure anywhere in the data
            return found + [_err("corrupt_media", path, f"decode failed ({_describe(e)})")], None
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            found.append(_err("corrupt_media", path, f"{bad} non-finite samples (NaN/Inf)"))
        elif not np.any(data):
            found.append(_warn("silent_audio", path, "all samples are zero"))
        n = int(data.shape[0])
    if sr != p.sample_rate:
        msg = f"{sr} Hz, will be resampled to {p.sample_rate} Hz"
        found.append(_warn("sample_rate", path, msg))
    if ch != 1:
        found.append(_warn("multichannel", path, f"{ch} channels, will be downmixed to mono"))
    if n < p.seconds * sr:
        msg = f"{n / sr:.3f} s ({n} frames), shorter than the {p.seconds:g} s clip: padded"
        found.append(_warn("short_audio", path, msg))
    return found, (sr, ch, n)


def _check_video_file(path: str, p: _Params) -> tuple[list[_Found], str | None]:
    import av

    try:
        container = av.open(store().open(path))
    except Exception as e:  # PyAV raises its own error classes for every FFmpeg failure
        return [_err("unreadable_media", path, f"cannot open video ({_describe(e)})")], None
    with container:
        if not container.streams.video:
            return [_err("unreadable_media", path, "no video stream")], None
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        found: list[_Found] = []
        if codec not in CPU_DECODABLE_CODECS:
            msg = f"codec {codec}: DALI decodes it only on a GPU (CPU: VP8, VP9, MJPEG)"
            found.append(_warn("cpu_undecodable", path, msg))
        if p.deep:
            try:
                found += _decode_video(container, stream, path)
            except Exception as e:  # a decode error anywhere in the stream
                found.append(_err("corrupt_media", path, f"decode failed ({_describe(e)})"))
        return found, codec


def _decode_video(container, stream, path: str) -> list[_Found]:
    """Decode every frame; a video ending well before its declared duration is truncated."""
    stream.thread_type = "AUTO"
    n, end = 0, 0.0
    for frame in container.decode(stream):
        n += 1
        if frame.time is not None:
            end = max(end, frame.time)
    if n == 0:
        return [_err("corrupt_media", path, "no frame decodes")]
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / 1e6  # microseconds (AV_TIME_BASE)
    else:
        return []
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    end += 1.0 / rate if rate > 0 else 0.0
    if end < declared - VIDEO_DURATION_SLACK_S:
        msg = f"decoded {n} frames up to {end:.2f} s of a declared {declared:.2f} s"
        return [_err("corrupt_media", path, msg)]
    return []


def _check_frames(
    entry: Entry, stats: Sequence[tuple[int, int] | None], p: _Params
) -> list[_Found]:
    from PIL import Image

    folder = entry.video_path
    shard = shard_member(folder)
    if shard is not None and not os.path.isfile(shard[0]):
        return [_err("missing_media", shard[0], "shard not found")]
    if shard is None and not os.path.isdir(folder):
        msg = "frames folder not found (a video file needs a video suffix such as .mp4 or .webm)"
        return [_err("missing_media", folder, msg)]
    missing = [k for k, s in enumerate(stats) if s is None]
    found: list[_Found] = []
    if missing:
        names = ", ".join(f"frame_{k}" for k in missing)
        msg = f"missing {names} (of frame_0..frame_{p.frames_per_clip - 1}) for {entry.video_id}"
        found.append(_err("missing_frames", folder, msg))
    for k, s in enumerate(stats):
        if s is None:
            continue
        path = entry.frame_path(k)
        try:
            with Image.open(store().open(path)) as im:
                if p.deep:
                    im.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad images
            kind = "corrupt_media" if p.deep else "unreadable_media"
            found.append(_err(kind, path, f"cannot read image ({_describe(e)})"))
    return found


def _check_entry(entry: Entry, p: _Params) -> _Result:
    files = _media_files(entry, p.frames_per_clip)
    # Stat before reading: a file changed during the check then differs from the stamp next run.
    stats = [_stat(f) for f in files]
    found: list[_Found] = []
    audio: _Audio | None = None
    codec: str | None = None
    if stats[0] is None:
        found.append(_err("missing_media", entry.wav, "audio file not found"))
    else:
        f, audio = _check_wav(entry.wav, p)
        found += f
    if entry.is_video_file:
        if stats[1] is None:
            found.append(_err("missing_media", entry.video_path, "video file not found"))
        else:
            f, codec = _check_video_file(entry.video_path, p)
            found += f
    else:
        found += _check_frames(entry, stats[1:], p)
    return _Result(_stamp(stats), tuple(found), audio, codec)


def _check_chunk(entries: Sequence[Entry], p: _Params) -> list[_Result]:
    return [_check_entry(e, p) for e in entries]


def _stamp_chunk(entries: Sequence[Entry], frames_per_clip: int) -> list[str]:
    return [_stamp([_stat(f) for f in _media_files(e, frames_per_clip)]) for e in entries]


def _map_chunks(
    fn: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    chunk: int,
    workers: int,
    progress: bool,
    desc: str,
) -> list[R]:
    """``fn`` over chunks of ``items`` in a process pool; results in ``items`` order.

    Processes, not threads: parsing headers with soundfile, PIL and PyAV costs ~60 us (wav,
    JPEG) to ~1 ms (video file) of CPU, mostly under the GIL, so threads stay on one core.
    Spawned workers, because forking a process that already runs torch or DALI threads can
    deadlock. One chunk runs in-process.
    """
    from tqdm import tqdm

    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    out: list[R] = []
    with tqdm(total=len(items), desc=desc, unit="clip", disable=not progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                out += fn(c)
                bar.update(len(c))
            return out
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
            for res in _bounded_map(pool, fn, chunks, 4 * workers):
                out += res
                bar.update(len(res))
    return out


def _bounded_map(
    pool: Executor, fn: Callable[[T], R], args: Sequence[T], window: int
) -> Iterator[R]:
    """``pool.map`` with at most ``window`` tasks in flight, so 2M entries are not all pickled."""
    pending: deque[Future[R]] = deque()
    it = iter(args)
    for a in it:
        pending.append(pool.submit(fn, a))
        if len(pending) >= window:
            break
    while pending:
        res = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield res


def default_workers() -> int:
    """Worker processes for the media pass: one per core (raise it for high-latency storage)."""
    return min(32, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Cache


def _file_key(path: str | os.PathLike | None) -> list | None:
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _cache_dirs(json_path: Path) -> list[Path]:
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = Path(xdg) if xdg else Path.home() / ".cache"
    return [json_path.resolve().parent / ".equiav-cache", home / "equiav"]


def _cache_name(json_path: Path, p: _Params) -> str:
    # The name pins the dataset path and the parameters; the file's key pins the file contents,
    # so a changed JSON overwrites its old cache instead of leaving it behind.
    ident = json.dumps([str(json_path.resolve()), dataclasses.astuple(p)])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return f"check-{json_path.stem}-{digest}.json"


def _load_cache(dirs: Sequence[Path], name: str, key: dict, n: int) -> tuple[Path, dict] | None:
    for d in dirs:
        path = d / name
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue  # absent or half-written by a crashed run: ignore it
        if doc.get("format") == CACHE_FORMAT and doc.get("key") == key and len(doc["stamps"]) == n:
            return path, doc
    return None


def _read_entries(json_path: Path) -> EntryTable:
    """``read_dataset``, through a cache of the parsed table beside the check's cache (an
    ``.npz`` of plain arrays, keyed by the JSON's path, size and mtime): a 2M-clip JSON takes
    ~15 s to parse, the table ~0.3 s to load, and every rank of every run reads it."""
    key = json.dumps({"format": ENTRIES_CACHE_FORMAT, "json": _file_key(json_path)})
    digest = hashlib.sha256(str(json_path.resolve()).encode()).hexdigest()[:16]
    name = f"entries-{json_path.stem}-{digest}.npz"
    dirs = _cache_dirs(json_path)
    for d in dirs:
        try:
            with np.load(d / name, allow_pickle=False) as arrays:
                if str(arrays["key"]) == key:
                    return EntryTable.from_arrays({k: arrays[k] for k in arrays.files})
        except (OSError, ValueError, KeyError, EOFError):
            continue  # absent, half-written or of another format: read the JSON
    table = read_dataset(json_path)
    _write_first(dirs, name, lambda tmp: np.savez(tmp, key=np.array(key), **table.to_arrays()))
    return table


@dataclass
class _Media:
    """Media results of a whole list, by column: 2M small objects would cost seconds to build."""

    stamps: list[str | None]
    audio: list[_Audio | None]
    codec: list[str | None]
    found: dict[int, tuple[_Found, ...]]  # findings are rare: sparse, by entry index

    @classmethod
    def empty(cls, n: int) -> _Media:
        return cls([None] * n, [None] * n, [None] * n, {})

    def put(self, i: int, r: _Result) -> None:
        self.stamps[i], self.audio[i], self.codec[i] = r.stamp, r.audio, r.codec
        if r.found:
            self.found[i] = r.found

    def take(self, i: int, other: _Media) -> None:
        self.stamps[i] = other.stamps[i]
        self.audio[i] = other.audio[i]
        self.codec[i] = other.codec[i]
        if i in other.found:
            self.found[i] = other.found[i]


def _write_first(dirs: Sequence[Path], name: str, write: Callable[[Path], None]) -> Path | None:
    """``write(tmp)`` a cache file in the first of ``dirs`` that takes it, then rename it to
    ``name`` there (atomic: concurrent ranks never read a half-written cache); its path, or
    None when no folder is writable."""
    for d in dirs:
        path = d / name
        tmp = d / f".{name}.tmp{os.getpid()}{path.suffix}"  # np.savez wants its suffix
        try:
            d.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return None


def _save_cache(dirs: Sequence[Path], name: str, key: dict, media: _Media) -> Path | None:
    doc = {
        "format": CACHE_FORMAT,
        "key": key,
        "stamps": media.stamps,
        "audio": media.audio,
        "codec": media.codec,
        "found": {str(i): f for i, f in media.found.items()},
    }
    text = json.dumps(doc, separators=(",", ":"))
    return _write_first(dirs, name, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _media_from_cache(doc: dict) -> _Media:
    return _Media(
        stamps=doc["stamps"],
        audio=[tuple(a) if a is not None else None for a in doc["audio"]],
        codec=doc["codec"],
        found={int(i): tuple(tuple(f) for f in fs) for i, fs in doc["found"].items()},
    )


# ---------------------------------------------------------------------------------------------
# Checks that need the whole list (cheap: never cached)


def _label_issues(
    entries: EntryTable, labels: LabelSet | None, json_path: str, label_csv: str | None
) -> dict[int, list[Issue]]:
    # By column: building 2M entries to look at their ids and labels would cost seconds.
    ids = list(entries.video_ids)
    counts = np.diff(entries.label_ptr)
    empty = set(np.flatnonzero(counts == 0).tolist())
    unknown_at: dict[int, list[str]] = {}
    if labels is not None:
        vocab = entries.vocabulary
        known = np.array([m in labels.index for m in vocab] + [True])  # [True]: an empty vocab
        bad = np.flatnonzero(~known[entries.label_ids])
        for pos in bad.tolist():
            row = int(np.searchsorted(entries.label_ptr, pos, side="right")) - 1
            unknown_at.setdefault(row, []).append(vocab[entries.label_ids[pos]])
    first: dict[str, int] = {}
    duplicate_of: dict[int, int] = {}
    for i, vid in enumerate(ids):
        if first.setdefault(vid, i) != i:
            duplicate_of[i] = first[vid]
    out: dict[int, list[Issue]] = {}
    for i in sorted(empty | unknown_at.keys() | duplicate_of.keys()):
        found = []
        if i in empty:
            found.append(Issue(ERROR, "empty_labels", i, ids[i], json_path, "no labels"))
        if i in unknown_at:
            msg = f"label ids {unknown_at[i]} not in {label_csv}"
            found.append(Issue(ERROR, "unknown_label", i, ids[i], json_path, msg))
        if i in duplicate_of:
            msg = f"video id already used by entry {duplicate_of[i]}"
            found.append(Issue(ERROR, "duplicate_id", i, ids[i], json_path, msg))
        out[i] = found
    return out


def check_dataset(
    json_path: str | os.PathLike,
    label_csv: str | os.PathLike | None = None,
    *,
    weights_csv: str | os.PathLike | None = None,
    seconds: float = 10.0,
    sample_rate: int = 16000,
    frames_per_clip: int = 10,
    deep: bool = False,
    workers: int | None = None,
    use_cache: bool = True,
    trust_cache: bool = False,
    progress: bool = True,
) -> CheckReport:
    """Check every entry of ``json_path``; see the module docstring for what is reported.

    ``trust_cache``: take a matching cache's media results (same JSON, label CSV and
    parameters) without stat-ing the media again. For the ranks after the first of a job, once
    rank 0 has checked the list and written the cache: a 2M-clip list in the frames layout is
    22M files to stat, per rank.

    Raises ``DatasetError`` (naming the file) when the JSON, the label CSV or the weights file
    cannot be read at all, or the weights do not match the entries one to one.
    """
    json_path = Path(json_path)
    entries = _read_entries(json_path) if use_cache else read_dataset(json_path)
    labels = read_label_csv(label_csv) if label_csv is not None else None
    weights = read_weights(weights_csv, expected=len(entries)) if weights_csv is not None else None
    p = _Params(float(seconds), int(sample_rate), int(frames_per_clip), bool(deep))
    workers = default_workers() if workers is None else max(1, int(workers))
    n = len(entries)

    media = _Media.empty(n)
    cache_path: Path | None = None
    if use_cache:
        key = {
            "json": _file_key(json_path),
            "labels": _file_key(label_csv),
            "params": dataclasses.asdict(p),
        }
        dirs, name = _cache_dirs(json_path), _cache_name(json_path, p)
        loaded = _load_cache(dirs, name, key, n)
        if loaded is not None:
            cache_path = loaded[0]
            cached = _media_from_cache(loaded[1])
        if loaded is not None and trust_cache:
            media = cached
        elif loaded is not None:
            stamps = _map_chunks(
                functools.partial(_stamp_chunk, frames_per_clip=frames_per_clip),
                entries,
                CHUNK_STAT,
                workers,
                progress,
                "stat",
            )
            for i in range(n):
                if stamps[i] == cached.stamps[i]:
                    media.take(i, cached)
    todo = [i for i in range(n) if media.stamps[i] is None]

    fresh = _map_chunks(
        functools.partial(_check_chunk, p=p),
        [entries[i] for i in todo],
        CHUNK_DEEP if deep else CHUNK,
        workers,
        progress,
        "check",
    )
    for i, r in zip(todo, fresh, strict=True):
        media.put(i, r)
    if use_cache and (todo or cache_path is None):
        cache_path = _save_cache(dirs, name, key, media)

    label_found = _label_issues(entries, labels, str(json_path), _str(label_csv))
    issues: list[Issue] = []
    for i in sorted(label_found.keys() | media.found.keys()):
        vid = entries[i].video_id
        issues += label_found.get(i, [])
        issues += [Issue(sev, kind, i, vid, f, msg) for sev, kind, f, msg in media.found.get(i, ())]
    return CheckReport(
        json_path=str(json_path),
        label_csv=_str(label_csv),
        deep=p.deep,
        entries=entries,
        issues=issues,
        audio_info=media.audio,
        video_codec=media.codec,
        weights=weights,
        from_cache_count=n - len(todo),
        checked_count=len(todo),
        cache_path=str(cache_path) if cache_path is not None else None,
    )


def _str(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(path)


def write_clean(
    report: CheckReport, out_json: str | os.PathLike, weights_out: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Write the usable entries to ``out_json`` and their weights beside them, in step.

    Weights are the given weights' rows of the kept entries (in order), or recomputed with
    ``compute_weights`` over the kept entries when the report has none. Paths in ``out_json`` are
    relative when it sits in the source JSON's folder, absolute otherwise. The weights go to
    ``weights_out`` or, by default, ``weights.csv`` in ``out_json``'s folder; next to the source
    JSON that name belongs to the source list, so there ``weights_out`` must be given.
    """
    out_json, src = Path(out_json).resolve(), Path(report.json_path).resolve()
    if out_json == src:
        raise DatasetError(f"{out_json}: refusing to overwrite the dataset being checked")
    same_folder = out_json.parent == src.parent
    if weights_out is None:
        if same_folder:
            raise DatasetError(
                f"{out_json}: next to {src.name}, weights.csv belongs to the source list; "
                "name the clean weights file (--clean-weights)"
            )
        weights_out = out_json.parent / "weights.csv"
    weights_out = Path(weights_out)
    write_dataset(out_json, report.clean_entries(), relative=same_folder)
    write_weights(weights_out, report.clean_weights())
    return out_json, weights_out


# ---------------------------------------------------------------------------------------------
# Command line


def _print_issues(issues: Iterable[Issue], max_per_kind: int) -> None:
    shown: Counter = Counter()
    total = Counter((i.severity, i.kind) for i in issues)
    for i in issues:
        k = (i.severity, i.kind)
        shown[k] += 1
        if shown[k] <= max_per_kind:
            print(i.format())
        elif shown[k] == max_per_kind + 1:
            more = total[k] - max_per_kind
            print(f"... and {more} more {i.severity.upper()} {i.kind}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m equiav.data.check",
        description="Check a dataset JSON's entries, media and labels before training.",
    )
    ap.add_argument("json", help="dataset JSON")
    ap.add_argument("--label-csv", required=True, help="class_labels_indices.csv")
    ap.add_argument("--weights", help="weights.csv of the dataset (one row per entry)")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds")
    ap.add_argument("--sample-rate", type=int, default=16000, help="model sample rate in Hz")
    ap.add_argument(
        "--frames-per-clip", type=int, help="frames per clip in frames folders (floor(--seconds))"
    )
    ap.add_argument("--deep", action="store_true", help="decode all media (slow)")
    ap.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    ap.add_argument(
        "--cpu-only", action="store_true", help="count cpu_undecodable videos as errors"
    )
    ap.add_argument("--write-clean", metavar="OUT.json", help="write the usable entries here")
    ap.add_argument(
        "--clean-weights", metavar="W.csv", help="weights of --write-clean (OUT's weights.csv)"
    )
    ap.add_argument("--report", metavar="R.json", help="write every issue to this JSON file")
    ap.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--max-lines", type=int, default=20, help="issues shown per kind")
    args = ap.parse_args(argv)

    fpc = args.frames_per_clip if args.frames_per_clip is not None else math.floor(args.seconds)
    try:
        report = check_dataset(
            args.json,
            args.label_csv,
            weights_csv=args.weights,
            seconds=args.seconds,
            sample_rate=args.sample_rate,
            frames_per_clip=fpc,
            deep=args.deep,
            workers=args.workers,
            use_cache=not args.no_cache,
            progress=not args.no_progress,
        )
        if args.cpu_only:
            report = report.promote("cpu_undecodable")
        _print_issues(report.issues, args.max_lines)
        print(report.summary())
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
            print(f"report: {args.report}")
        if args.write_clean:
            out, w = write_clean(report, args.write_clean, args.clean_weights)
            print(f"clean: {len(report.usable)} entries -> {out}, weights -> {w}")
    except DatasetError as e:
        print(f"FATAL {e}", file=sys.stderr)
        return 2
    if report.errors() or (args.strict and report.warnings()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
