"""Write a dataset into WebDataset tar shards that the loader (and DALI's own reader) reads.

Command line::

    python -m equiav.data.shard DATA.json --out DIR --shard-size N [--seed S] \\
        [--frames-per-clip F] [--weights W.csv] [--no-progress]

Writes under ``DIR`` (one folder per dataset list):

- ``shard-000000.tar``, ``shard-000001.tar``, ...: standard (ustar) WebDataset shards of ``N``
  clips each (the last one shorter). Per clip, with ``key`` the video id made safe for a member
  name (letters, digits, ``_`` and ``-``; WebDataset splits a name at its first dot):
  ``{key}.wav``, then ``{key}.frame0.jpg`` .. ``{key}.frame{F-1}.jpg`` (frames layout) or
  ``{key}.webm`` / ``{key}.mp4`` (the video file, its own suffix), then ``{key}.json``
  (``{"video_id", "labels"}``). The bytes are the source files' bytes, unchanged.
- ``shard-000000.idx``, ...: DALI's index of each shard (the ``wds2idx`` format ``v1.2``: a
  line ``v1.2 {samples}``, then one line per sample of ``{ext} {offset} {size} {name}`` per
  component, offset being the member's data offset in the tar), which ``fn.readers.webdataset``
  takes as ``index_paths`` and the loader uses to read a member with one ``pread``.
- ``{stem}.json``: the dataset list (``stem`` of ``DATA.json``), its media paths naming shard
  members (``shard-000000.tar:{key}.wav``, ``...:{key}.webm`` or ``...:{key}`` for frames; see
  ``equiav.data.index``), so that ``data.train_json`` / ``test_json`` can name it as any list.
- ``index.json``: the source list, layout, frames per clip, shard size, the shards (file, index,
  clips, bytes), the clips left out and why, and per clip (video id) its shard and every
  member's (offset, size).
- ``weights.csv`` with ``--weights``: the given class-balanced weights of the clips written (an
  earlier run's is removed otherwise: its rows would not match the list).

Clips keep the dataset list's order (the loader shuffles by position). ``--seed S`` writes them in
a seeded random order instead, for sequential readers (such as ``fn.readers.webdataset``) whose
shuffle buffer only mixes neighbouring samples; the list then follows the shards' order.

Every input file is read and checked as the loader checks it (wav structure, JPEG markers, a
video container PyAV opens); a missing or corrupt file leaves its clip out, logged with a running
count and named in ``index.json``'s ``skipped``, as is a repeated video id. Each shard is written
to a temporary name and renamed when complete (its old index removed first), so a reader never
sees half a shard; shards of an earlier, longer run are removed. Inputs may be files or shards.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from equiav.data.index import (
    DatasetError,
    Entry,
    read_dataset,
    read_weights,
    shard_member,
    write_dataset,
    write_weights,
)
from equiav.data.media import CorruptMediaError, store

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
IDX_VERSION = "v1.2"
FORMAT = 1
_BLOCK = 512
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_KEY_MAX = 80  # + ".frame9.jpg" stays within ustar's 100-character names
_SHARD_NAME = re.compile(r"^shard-(\d{6})\.(tar|idx)$")
_MAX_FRAMES = 1000


def shard_name(number: int) -> str:
    """File name of shard ``number``."""
    return f"shard-{number:06d}.tar"


def idx_path(tar: str | os.PathLike) -> Path:
    """The DALI index file beside a shard: ``shard-000000.tar`` -> ``shard-000000.idx``."""
    return Path(tar).with_suffix(".idx")


# ---------------------------------------------------------------------------------------------
# Shard index: DALI's wds2idx format, and the compact lookup the media store keeps in memory

# One sample: its components as (ext, data offset, size, member name), in tar order.
Sample = list[tuple[str, int, int, str]]


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, WebDataset's rule: split at the first dot."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


@dataclass
class ShardIndex:
    """Where each member of one shard lies: key -> row, extension -> column, (offset, size)."""

    rows: dict[str, int]
    cols: dict[str, int]
    loc: np.ndarray  # (clips, extensions, 2) int64; -1 where a clip lacks that extension

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> ShardIndex:
        rows: dict[str, int] = {}
        cols: dict[str, int] = {}
        for sample in samples:
            for ext, _, _, name in sample:
                rows.setdefault(split_name(name)[0], len(rows))
                cols.setdefault(ext, len(cols))
        loc = np.full((len(rows), len(cols), 2), -1, np.int64)
        for sample in samples:
            for ext, offset, size, name in sample:
                loc[rows[split_name(name)[0]], cols[ext]] = (offset, size)
        return cls(rows, cols, loc)

    def locate(self, member: str) -> tuple[int, int] | None:
        """(data offset, size) of a member, or None when the shard has no such member."""
        key, ext = split_name(member)
        row, col = self.rows.get(key), self.cols.get(ext)
        if row is None or col is None or self.loc[row, col, 0] < 0:
            return None
        offset, size = self.loc[row, col]
        return int(offset), int(size)


def write_idx(path: str | os.PathLike, samples: Sequence[Sample]) -> None:
    """Write DALI's webdataset index (``wds2idx`` v1.2), atomically."""
    lines = [f"{IDX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]
    _atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def read_idx(path: str | os.PathLike) -> list[Sample]:
    """Parse a ``wds2idx`` v1.2 index file (``ValueError`` naming it when it is not one)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != IDX_VERSION:
            raise ValueError(f"{path}: not a {IDX_VERSION} webdataset index (header {header})")
        samples = []
        for line_no, line in enumerate(f, start=2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) % 4:
                raise ValueError(f"{path}:{line_no}: expected 'ext offset size name' groups")
            samples.append(
                [(e, int(o), int(s), n) for e, o, s, n in zip(*[iter(parts)] * 4, strict=True)]
            )
    if len(samples) != int(header[1]):
        raise ValueError(f"{path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def scan_tar(tar: str | os.PathLike) -> list[Sample]:
    """The regular members of a tar grouped into samples by key, as ``wds2idx`` groups them."""
    samples: list[Sample] = []
    last = None
    try:
        with tarfile.open(tar, "r:") as t:
            for m in t:
                if not m.isreg():
                    continue
                key, ext = split_name(m.name)
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.TarError, EOFError) as e:
        raise CorruptMediaError(f"{tar}: not a readable tar shard ({e})") from None
    return samples


def load_index(tar: str | os.PathLike) -> ShardIndex:
    """A shard's member index: from its ``.idx`` file, else (logged) by scanning the tar."""
    idx = idx_path(tar)
    if idx.exists():
        return ShardIndex.from_samples(read_idx(idx))
    log.warning("%s: no index file %s; scanning the tar (slow for big shards)", tar, idx.name)
    return ShardIndex.from_samples(scan_tar(tar))


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardReport:
    """What ``write_shards`` wrote: the dataset list, the shards, the clips left out."""

    out: Path
    dataset_json: Path
    shards: list[str]
    clips: int
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line: clips, shards, the list written, clips skipped."""
        return (
            f"{self.out}: {self.clips} clips in {len(self.shards)} shard(s), list "
            f"{self.dataset_json.name}; {len(self.skipped)} clips skipped"
            + (f" (see {INDEX_NAME})" if self.skipped else "")
        )


def safe_key(video_id: str) -> str:
    """A member-name key for a video id: no dots (WebDataset's separator), no folders."""
    return _KEY_CHARS.sub("_", video_id)[:_KEY_MAX] or "clip"


def _layout(entries: Sequence[Entry], json_path: Path) -> str:
    """``frames`` or the video files' suffix (``webm``, ``mp4``, ...); one per list."""
    kinds = {
        os.path.splitext(e.video_path)[1].lower().lstrip(".") if e.is_video_file else "frames"
        for e in entries
    }
    if len(kinds) != 1:
        raise DatasetError(f"{json_path}: mixes layouts {sorted(kinds)}; shard one per list")
    return kinds.pop()


def detect_frames(entry: Entry) -> int:
    """Frames per clip of the frames layout: how many ``frame_{k}`` exist for the first entry's
    folder (or, for a sharded input, members ``{key}.frame{k}.jpg``)."""
    sharded = shard_member(entry.video_path) is not None

    def present(k: int) -> bool:
        if sharded:
            return store().stat(entry.frame_path(k)) is not None
        return os.path.isdir(os.path.join(entry.video_path, f"frame_{k}"))

    n = 0
    while n < _MAX_FRAMES and present(n):
        n += 1
    if n == 0:
        raise DatasetError(f"{entry.video_path}: no frame_0 for {entry.video_id}")
    return n


class UnreadableClip(Exception):
    """A clip's input ``file`` is missing or broken (``reason``); the clip is left out."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(reason)
        self.file, self.reason = file, reason


def _check_video(path: str, data: np.ndarray) -> None:
    import av

    try:
        with av.open(io.BytesIO(data.tobytes())) as c:
            if not c.streams.video:
                raise CorruptMediaError(f"{path}: no video stream")
    except av.FFmpegError as e:
        raise CorruptMediaError(f"{path}: not a video container ({e})") from None


def read_clip(entry: Entry, layout: str, frames: int) -> list[tuple[str, bytes]]:
    """The clip's members as (extension, bytes), each input read and checked as the loader does.

    Raises ``UnreadableClip`` naming the first file that is missing or broken.
    """
    from dali_pipelines.sources import validate_jpeg, validate_wav

    def get(path: str, check) -> bytes:
        try:
            data = store().read(path)
            check(path, data)
        except (OSError, CorruptMediaError) as e:
            raise UnreadableClip(path, str(e)) from None
        return data.tobytes()

    members = [("wav", get(entry.wav, validate_wav))]
    if layout == "frames":
        members += [
            (f"frame{k}.jpg", get(entry.frame_path(k), validate_jpeg)) for k in range(frames)
        ]
    else:
        members.append((layout, get(entry.video_path, _check_video)))
    meta = {"video_id": entry.video_id, "labels": list(entry.labels)}
    members.append(("json", json.dumps(meta).encode()))
    return members


class _ShardWriter:
    """One shard being written to a temporary name; ``close`` renames it and writes its index."""

    def __init__(self, out: Path, number: int) -> None:
        self.name = shard_name(number)
        self.path = out / self.name
        self.tmp = out / f".{self.name}.tmp{os.getpid()}"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.samples: list[Sample] = []
        self.ids: list[str] = []

    def add(
        self, video_id: str, key: str, members: Sequence[tuple[str, bytes]], mtime: int
    ) -> None:
        sample: Sample = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
            # After addfile the tar's offset is past the data and its padding to whole blocks.
            offset = self.tar.offset - -(-len(data) // _BLOCK) * _BLOCK
            sample.append((ext, offset, len(data), info.name))
        self.samples.append(sample)
        self.ids.append(video_id)

    def close(self) -> int:
        self.tar.close()
        idx = idx_path(self.path)
        idx.unlink(missing_ok=True)  # never leave an old index beside the new shard
        os.replace(self.tmp, self.path)
        write_idx(idx, self.samples)
        return self.path.stat().st_size

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def _mtime(path: str) -> int:
    ref = shard_member(path)
    try:
        return int(os.stat(ref[0] if ref else path).st_mtime)
    except OSError:
        return 0


def write_shards(
    json_path: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int,
    *,
    seed: int | None = None,
    frames_per_clip: int | None = None,
    weights_csv: str | os.PathLike | None = None,
    progress: bool = True,
) -> ShardReport:
    """Write the clips of ``json_path`` into shards under ``out`` (see the module docstring)."""
    from tqdm import tqdm

    if shard_size < 1:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    json_path, out = Path(json_path), Path(out)
    dataset_json = out / json_path.name
    if dataset_json.resolve() == json_path.resolve():
        raise DatasetError(f"{json_path}: --out would overwrite the list being sharded")
    entries = read_dataset(json_path)
    if not entries:
        raise DatasetError(f"{json_path}: no entries")
    weights = read_weights(weights_csv, len(entries)) if weights_csv is not None else None
    layout = _layout(entries, json_path)
    frames = 0
    if layout == "frames":
        frames = frames_per_clip if frames_per_clip is not None else detect_frames(entries[0])
    order = np.arange(len(entries))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(entries))
    out.mkdir(parents=True, exist_ok=True)

    skipped: list[dict] = []
    kept: list[Entry] = []
    kept_rows: list[int] = []
    shards: list[dict] = []
    ids: set[str] = set()
    keys: set[str] = set()
    writer: _ShardWriter | None = None
    # index.json's per-clip part is streamed to a file shard by shard: for millions of clips it
    # would not fit in memory as Python objects.
    clips_tmp = out / f".{INDEX_NAME}.clips.tmp{os.getpid()}"
    clips_file = open(clips_tmp, "w", encoding="utf-8")

    def skip(entry: Entry, file: str, reason: str) -> None:
        skipped.append({"video_id": entry.video_id, "file": file, "reason": reason})
        log.warning("skipping %s (%d skipped so far): %s", entry.video_id, len(skipped), reason)

    def finish(w: _ShardWriter) -> None:
        size = w.close()
        shards.append(
            {"file": w.name, "index": idx_path(w.name).name, "clips": len(w.samples), "bytes": size}
        )
        for video_id, sample in zip(w.ids, w.samples, strict=True):
            clip = {
                "shard": w.name,
                "key": split_name(sample[0][3])[0],
                "members": {name: [o, s] for _, o, s, name in sample},
            }
            sep = ",\n" if clips_file.tell() else ""
            clips_file.write(f"{sep}  {json.dumps(video_id)}: {json.dumps(clip)}")

    try:
        for i in tqdm(order.tolist(), desc="shard", unit="clip", disable=not progress):
            entry = entries[i]
            if entry.video_id in ids:
                skip(entry, str(json_path), "video id already written")
                continue
            key = safe_key(entry.video_id)
            if key in keys:
                key = f"{key[: _KEY_MAX - 12]}_{i}"
            try:
                members = read_clip(entry, layout, frames)
            except UnreadableClip as e:
                skip(entry, e.file, e.reason)
                continue
            if writer is None:
                writer = _ShardWriter(out, len(shards))
            writer.add(entry.video_id, key, members, _mtime(entry.wav))
            ids.add(entry.video_id)
            keys.add(key)
            ref = f"{out / writer.name}:{key}"
            video = ref if layout == "frames" else f"{ref}.{layout}"
            kept.append(Entry(entry.video_id, f"{ref}.wav", video, entry.labels))
            kept_rows.append(i)
            if len(writer.samples) == shard_size:
                finish(writer)
                writer = None
        if writer is not None:
            finish(writer)
            writer = None
        clips_file.close()
        _remove_stale(out, len(shards))
        write_dataset(dataset_json, kept)
        if weights is not None:
            write_weights(out / "weights.csv", weights[kept_rows])
        elif (out / "weights.csv").exists():  # an earlier run's: its rows would not match
            log.info("removing %s from an earlier run", out / "weights.csv")
            (out / "weights.csv").unlink()
        doc = {
            "format": FORMAT,
            "source": str(json_path.resolve()),
            "dataset_json": dataset_json.name,
            "layout": layout,
            "frames_per_clip": frames or None,
            "shard_size": shard_size,
            "seed": seed,
            "clips": len(kept),
            "shards": shards,
            "skipped": skipped,
        }
        _write_index(out / INDEX_NAME, doc, clips_tmp)
    finally:
        if writer is not None:  # an exception mid-shard: no half-written file left behind
            writer.abort()
        clips_file.close()
        clips_tmp.unlink(missing_ok=True)
    return ShardReport(out, dataset_json, [s["file"] for s in shards], len(kept), skipped)


def _write_index(path: Path, doc: dict, clips: Path) -> None:
    """``doc`` plus a ``"samples"`` object whose members are the lines of ``clips``, atomically."""
    head = json.dumps(doc, indent=1)  # ends with "\n}"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f, open(clips, encoding="utf-8") as src:
        f.write(head[:-2] + ',\n "samples": {\n')
        shutil.copyfileobj(src, f)
        f.write("\n }\n}\n")
    os.replace(tmp, path)


def _remove_stale(out: Path, count: int) -> None:
    """Shards (and their indexes) numbered beyond this run's, left by an earlier, longer run."""
    for path in out.iterdir():
        m = _SHARD_NAME.match(path.name)
        if m and int(m[1]) >= count:
            log.info("removing %s from an earlier run", path)
            path.unlink()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: Iterable[str] | None = None) -> int:
    """Command line entry point; returns the exit code (1 when no clip was written)."""
    ap = argparse.ArgumentParser(
        prog="python -m equiav.data.shard",
        description="Write a dataset list into WebDataset tar shards with DALI index files.",
    )
    ap.add_argument("json", help="dataset JSON (frames folders or video files)")
    ap.add_argument("--out", required=True, help="output folder (one per dataset list)")
    ap.add_argument("--shard-size", type=int, default=1000, help="clips per shard")
    ap.add_argument("--seed", type=int, help="write clips in this seeded random order")
    ap.add_argument("--frames-per-clip", type=int, help="frames layout (default: detected)")
    ap.add_argument("--weights", help="the list's weights.csv, written for the kept clips")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = write_shards(
            args.json,
            args.out,
            args.shard_size,
            seed=args.seed,
            frames_per_clip=args.frames_per_clip,
            weights_csv=args.weights,
            progress=not args.no_progress,
        )
    except DatasetError as e:
        print(f"FATAL {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.clips else 1


if __name__ == "__main__":
    sys.exit(main())
