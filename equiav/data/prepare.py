"""Turn a folder of raw videos and a label CSV into a dataset the trainer reads.

Command line::

    python -m equiav.data.prepare VIDEOS --labels LABELS.csv --out DIR \\
        [--label-csv class_labels_indices.csv] [--json-name data.json] [--seconds 10] \\
        [--jpeg-quality 90] [--max-short-side 224] [--no-center-crop] [--first-channel] \\
        [--workers N]

Inputs
------
- ``VIDEOS``: a folder (searched recursively for the suffixes in ``VIDEO_SUFFIXES``) or a list
  file with one video path per line (relative paths are relative to the list's folder; ``#``
  starts a comment). Any container and codec FFmpeg decodes works: PyAV reads them.
- ``--labels``: one of two CSV formats, told apart by their rows (``#`` lines are comments):

  * AudioSet's segment files: ``YTID, start_seconds, end_seconds, "label,label,..."`` with the
    header comment lines AudioSet ships. A video belongs to a row when its file stem is the YTID,
    or the YTID followed by ``_{start}_{end}`` (CAV-MAE's names, e.g. ``abc_30_40.mp4``). The
    files are taken to be the segments already cut (as downloaders and CAV-MAE store them).
  * ``path,labels`` rows (an optional ``path,labels`` header): a video belongs to a row when the
    stems of the two paths agree. Without ``VIDEOS``, the rows' paths (relative to the CSV's
    folder) are the videos.

  Labels are label ids (``/m/...``); with ``--label-csv`` a display name is accepted too, and a
  labels field that is, as a whole, one known id or name is one label even if it holds commas
  (VGGSound's names do). The clip id is the video's file stem.
- ``--label-csv``: the vocabulary (``class_labels_indices.csv``). Without it the vocabulary is
  every label of the labels CSV, sorted (its display names are the ids). To prepare several
  splits with one vocabulary, pass the first split's ``class_labels_indices.csv`` to the others.

Outputs under ``--out``
-----------------------
- ``wav/{id}.wav``: 16 kHz mono 16-bit PCM, the first ``--seconds`` of the audio stream. The
  decoded channels are averaged (DALI's downmix; ``--first-channel`` keeps channel 0 instead, as
  CAV-MAE's ``sox remix 1`` does), then resampled with ``kernels.resample`` (band-limited; DALI's
  resampler aliases, and CAV-MAE's ``ffmpeg -ar 16000`` is another filter again).
- ``frames/frame_{k}/{id}.jpg``, k = 0..9 with k + 0.5 < ``--seconds``: the frame on screen at
  k + 0.5 s, i.e. the last frame whose timestamp relative to the video stream's first frame is
  <= k + 0.5 s, the rule ``dali_pipelines.video.frame_index_at`` applies to video files, so both
  layouts show the model the same frame. Frames are converted to RGB by PyAV (swscale), then
  resized so that the shorter side is at most ``--max-short-side`` (bilinear, never enlarged; 0
  keeps the decoded size) and centre-cropped to a square unless ``--no-center-crop``, and saved
  as JPEG of quality ``--jpeg-quality``. Defaults follow CAV-MAE's ``extract_video_frame.py``,
  whose frames the paper trained on: it stores ``Resize(224)`` (bilinear) + ``CenterCrop(224)``
  images, not full frames (and saves them at PIL's default JPEG quality, 75; we default to 90).
  It picks frame ``int(k * n / 10) - 1`` of n; we pick by time as the spec says (k + 0.5 s).
- ``--json-name`` (default ``data.json``): the dataset list, ``video_path`` being the ``frames``
  folder (paths relative to the JSON). Clips are in the labels CSV's row order.
- ``class_labels_indices.csv`` (the vocabulary used) and ``weights.csv`` (class-balanced weights
  of the listed clips, ``equiav.data.index.compute_weights``).
- ``prepare_report.json``: counts, every failure and warning by clip, path, kind and message,
  and the video files that no CSV row names (``unlisted``). A summary line per kind is printed.

Policies
--------
- Failures (the clip is left out of the JSON, named in the report): ``missing_video`` (a CSV row
  without a file), ``duplicate_id``, ``empty_labels``, ``unknown_label``, ``unreadable`` (not a
  container FFmpeg opens), ``no_audio`` / ``no_video`` (a stream is missing: EquiAV needs both
  modalities), ``no_timestamps``, ``too_short`` (less than ``MIN_SECONDS`` of audio or video
  decodes), ``write_error``, and ``error`` for anything unexpected.
- Short or truncated clips: decoding stops at the first error; what decoded before it is kept
  when both modalities reach ``MIN_SECONDS``. Audio or video ending more than
  ``SHORT_TOLERANCE_S`` before ``--seconds`` is a warning (``short_audio``, ``short_video``,
  plus ``decode_error`` when an error cut it): the wav is written as long as it is (the
  pipeline pads), and the frame slots past the video's end repeat its last frame (the clamp
  ``frame_index_at`` applies to video files), so every clip has the same frame slots.
- Resuming: a clip is done when its marker ``.prepare/{id}.json`` exists, records the same source
  file (path, size, mtime) and options, and every output exists. Each output is written to a
  temporary name in its folder and renamed (``os.replace``), and the marker is written last, so
  an interrupted clip is never taken as done; it is prepared again. Failed clips are retried.
  Two runs must not write to the same ``--out`` at the same time.
- Parallelism: clips are prepared in ``--workers`` spawned processes (one torch thread each),
  in chunks, with a bounded number in flight, so millions of clips do not queue up in memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import re
import sys
import wave
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from equiav.data.index import (
    VIDEO_FILE_SUFFIXES,
    Entry,
    LabelSet,
    compute_weights,
    frame_path,
    read_label_csv,
    write_dataset,
    write_label_csv,
    write_weights,
)

SAMPLE_RATE = 16000
NUM_FRAME_SLOTS = 10  # the frames layout holds frame_0 .. frame_9
FRAME_OFFSET_S = 0.5  # frame_{k} is the frame on screen at k + 0.5 s (dali_pipelines.video)
MIN_SECONDS = 1.0  # less audio or video than this: the clip fails
SHORT_TOLERANCE_S = 0.1  # ending this much before --seconds is not yet "short"
# Same tolerance as dali_pipelines.video: container time bases make frame times inexact.
TIME_EPS_S = 1e-6
VIDEO_SUFFIXES = tuple(
    sorted(set(VIDEO_FILE_SUFFIXES) | {".flv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv", ".wmv"})
)
MARKER_DIR = ".prepare"
REPORT_NAME = "prepare_report.json"
CHUNK = 8  # clips per task sent to a worker
# A CAV-MAE style name: YTID_start_end (the YTID may itself hold underscores).
_SEGMENT_NAME = re.compile(r"^(.+)_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)$")
_PATH_HEADERS = {"path", "file", "filename", "video", "video_path"}


class PrepareError(ValueError):
    """An input file (labels CSV, list, vocabulary) cannot be used; the message names it."""


class ClipFailure(Exception):
    """One clip cannot be prepared: ``kind`` (see the module docstring) and a message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Options:
    """What decides a clip's outputs; a change makes done clips be prepared again."""

    seconds: float = 10.0
    jpeg_quality: int = 90
    max_short_side: int = 224  # 0: keep the decoded size
    center_crop: bool = True
    first_channel: bool = False

    def __post_init__(self) -> None:
        if self.seconds < MIN_SECONDS:
            raise ValueError(f"seconds must be >= {MIN_SECONDS}, got {self.seconds}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_short_side < 0:
            raise ValueError(f"max_short_side must be >= 0, got {self.max_short_side}")


@dataclass(frozen=True)
class Clip:
    """One clip to prepare: its id (the file stem), the video file and its label ids."""

    video_id: str
    path: str
    labels: tuple[str, ...]


@dataclass
class ClipResult:
    """What became of one clip: status ``prepared``, ``skipped`` (done before) or ``failed``."""

    video_id: str
    path: str
    status: str
    kind: str | None = None
    message: str = ""
    warnings: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PrepareReport:
    """The outcome of a run: per-clip results (CSV row order) and the files no row names."""

    out: str
    json_path: str
    results: list[ClipResult]
    unlisted: list[str]
    options: Options

    @property
    def failures(self) -> list[ClipResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        """Clips by status, plus those with warnings, those in the dataset and unlisted files."""
        status = Counter(r.status for r in self.results)
        return {
            "clips": len(self.results),
            "prepared": status["prepared"],
            "skipped": status["skipped"],
            "failed": status["failed"],
            "with_warnings": sum(1 for r in self.results if r.warnings and r.status != "failed"),
            "in_dataset": status["prepared"] + status["skipped"],
            "unlisted": len(self.unlisted),
        }

    def to_dict(self) -> dict:
        warnings = [
            {"video_id": r.video_id, "path": r.path, "kind": k, "message": m}
            for r in self.results
            if r.status != "failed"
            for k, m in r.warnings
        ]
        failures = [
            {"video_id": r.video_id, "path": r.path, "kind": r.kind, "message": r.message}
            for r in self.failures
        ]
        return {
            "out": self.out,
            "json": self.json_path,
            "options": asdict(self.options),
            "counts": self.counts(),
            "failures": failures,
            "warnings": warnings,
            "unlisted": self.unlisted,
        }

    def summary_lines(self) -> list[str]:
        """One line for the totals, then one per failure kind and per warning kind."""
        c = self.counts()
        lines = [
            f"prepare: {c['in_dataset']} of {c['clips']} clips in {self.json_path} "
            f"({c['prepared']} prepared, {c['skipped']} already done, {c['failed']} failed, "
            f"{c['with_warnings']} with warnings)"
        ]
        warned = [
            (k, r.video_id) for r in self.results if r.status != "failed" for k, _ in r.warnings
        ]
        for label, items in (("failed", [(r.kind, r.video_id) for r in self.failures]),
                             ("warning", warned)):  # fmt: skip
            by_kind: dict[str, list[str]] = {}
            for kind, video_id in items:
                by_kind.setdefault(str(kind), []).append(video_id)
            for kind, ids in sorted(by_kind.items()):
                shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
                lines.append(f"  {label} {kind}: {len(ids)} clips ({shown})")
        if self.unlisted:
            lines.append(
                f"  unlisted: {len(self.unlisted)} video files have no row in the labels CSV "
                "(not prepared; listed in the report)"
            )
        return lines


# ---------------------------------------------------------------------------------------------
# Inputs: videos, label rows, vocabulary, matching
# ---------------------------------------------------------------------------------------------


def find_videos(source: str | os.PathLike) -> list[str]:
    """Video files of a folder (recursive, by suffix, sorted) or of a list file (in its order)."""
    source = Path(source)
    if source.is_dir():
        found = [
            str(p.resolve())
            for p in source.rglob("*")
            if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
        ]
        return sorted(found)
    if not source.is_file():
        raise PrepareError(f"{source}: no such folder or list file")
    paths = []
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PrepareError(f"{source}: a list file must be UTF-8 text, one path per line") from None
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            paths.append(str((p if p.is_absolute() else source.resolve().parent / p).resolve()))
    return paths


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels CSV: the clip key, its raw labels field, where it came from."""

    key: str
    labels: str
    line: int
    path: str | None = None  # the path,labels format's video path (absolute)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_label_rows(path: str | os.PathLike) -> tuple[str, list[LabelRow]]:
    """Parse an AudioSet segments CSV or a ``path,labels`` CSV: (format, rows in file order).

    Format is ``"audioset"`` or ``"path"``, decided by the first data row; every row must have
    the same shape. Raises ``PrepareError`` naming the file and line otherwise.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrepareError(f"{path}: labels CSV not found") from None
    except UnicodeDecodeError:
        raise PrepareError(f"{path}: labels CSV is not UTF-8 text") from None
    fmt: str | None = None
    rows: list[LabelRow] = []
    base = path.resolve().parent
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in next(csv.reader([line], skipinitialspace=True))]
        is_audioset = len(cells) >= 4 and _is_number(cells[1]) and _is_number(cells[2])
        if fmt is None:
            if not is_audioset and cells[0].lower() in _PATH_HEADERS:
                fmt = "path"
                continue  # the header row
            if not is_audioset and len(cells) < 2:
                raise PrepareError(
                    f"{path}:{number}: expected 'YTID, start, end, \"labels\"' (AudioSet) or "
                    f"'path,labels', got {line.strip()!r}"
                )
            fmt = "audioset" if is_audioset else "path"
        if fmt == "audioset":
            if not is_audioset:
                raise PrepareError(
                    f"{path}:{number}: expected 'YTID, start_seconds, end_seconds, \"labels\"'"
                )
            rows.append(LabelRow(cells[0], cells[3], number))
        else:
            if len(cells) < 2 or not cells[0]:
                raise PrepareError(f"{path}:{number}: expected 'path,labels'")
            video = Path(cells[0])
            video = video if video.is_absolute() else base / video
            # Unquoted labels with commas arrive as extra cells: join them back.
            rows.append(LabelRow(video.stem, ",".join(cells[1:]), number, str(video.resolve())))
    if fmt is None:
        raise PrepareError(f"{path}: no label rows")
    return fmt, rows


class Vocabulary:
    """Label ids and display names, for turning a labels field into label ids."""

    def __init__(self, labels: LabelSet) -> None:
        self.labels = labels
        self.by_name: dict[str, str] = {}
        for mid, name in zip(labels.mids, labels.names, strict=True):
            self.by_name.setdefault(name, mid)

    def lookup(self, label: str) -> str | None:
        """The id of ``label`` (an id or a display name), or None when unknown."""
        if label in self.labels.index:
            return label
        return self.by_name.get(label)


def split_labels(field_: str, vocab: Vocabulary | None) -> list[str]:
    """A labels field as a list of labels (not yet checked against the vocabulary)."""
    whole = field_.strip()
    if vocab is not None and whole and vocab.lookup(whole) is not None:
        return [whole]  # one label whose name holds commas
    return [p.strip() for p in field_.split(",") if p.strip()]


def build_vocabulary(rows: Sequence[LabelRow]) -> LabelSet:
    """Every label of the rows, sorted; the display name of each is its id."""
    seen = sorted({label for row in rows for label in split_labels(row.labels, None)})
    return LabelSet(tuple(seen), tuple(seen))


def _row_key(stem: str, keys: dict[str, LabelRow]) -> str | None:
    """The CSV key a file stem belongs to: the stem itself, or the YTID of ``YTID_start_end``."""
    if stem in keys:
        return stem
    m = _SEGMENT_NAME.match(stem)
    if m and m.group(1) in keys:
        return m.group(1)
    return None


def _failed(video_id: str, path: str, kind: str, message: str) -> ClipResult:
    return ClipResult(video_id, path, "failed", kind, message)


def match_clips(
    videos: Sequence[str] | None,
    rows: Sequence[LabelRow],
    vocab: Vocabulary,
    labels_csv: str,
) -> tuple[list[Clip | ClipResult], list[str]]:
    """Pair label rows with video files, in row order: (a Clip or a failed result per row,
    video files that no row names).

    ``videos`` None takes the rows' own paths (``path,labels`` format).
    """
    by_key: dict[str, LabelRow] = {}
    out: list[Clip | ClipResult | None] = []
    slot: dict[str, int] = {}  # key -> position in out
    for row in rows:
        if row.key in by_key:
            msg = f"{labels_csv}:{row.line}: clip {row.key} is already on line "
            out.append(
                _failed(row.key, labels_csv, "duplicate_id", msg + str(by_key[row.key].line))
            )
            continue
        by_key[row.key] = row
        slot[row.key] = len(out)
        out.append(None)

    files: dict[str, str] = {}  # key -> video file
    unlisted: list[str] = []
    if videos is None:
        videos = [r.path for r in by_key.values() if r.path is not None and os.path.isfile(r.path)]
    for path in videos:
        stem = Path(path).stem
        key = _row_key(stem, by_key)
        if key is None:
            unlisted.append(path)
        elif key in files:
            msg = f"clip {key} has another video file: {files[key]}"
            out.append(_failed(stem, path, "duplicate_id", msg))
        else:
            files[key] = path

    for key, row in by_key.items():
        where = f"{labels_csv}:{row.line}"
        path = files.get(key)
        if path is None:
            msg = f"{where}: no video file for {row.path or key}"
            out[slot[key]] = _failed(key, row.path or labels_csv, "missing_video", msg)
            continue
        video_id = Path(path).stem
        names = split_labels(row.labels, vocab)
        unknown = [n for n in names if vocab.lookup(n) is None]
        if not names:
            out[slot[key]] = _failed(video_id, path, "empty_labels", f"{where}: no labels")
        elif unknown:
            msg = f"{where}: labels not in the vocabulary: {', '.join(unknown)}"
            out[slot[key]] = _failed(video_id, path, "unknown_label", msg)
        else:
            mids = tuple(dict.fromkeys(vocab.lookup(n) for n in names))  # dedupe, keep order
            out[slot[key]] = Clip(video_id, path, mids)
    return [o for o in out if o is not None], unlisted


# ---------------------------------------------------------------------------------------------
# One clip
# ---------------------------------------------------------------------------------------------


def frame_slots(seconds: float) -> list[int]:
    """The k of ``frame_{k}`` for clips of ``seconds``: k + 0.5 s inside the clip, k < 10."""
    return [k for k in range(NUM_FRAME_SLOTS) if k + FRAME_OFFSET_S < seconds]


def wav_path(out: str | os.PathLike, video_id: str) -> Path:
    """``{out}/wav/{video_id}.wav``."""
    return Path(out) / "wav" / f"{video_id}.wav"


def frames_dir(out: str | os.PathLike) -> Path:
    """``{out}/frames``: the dataset entries' ``video_path``."""
    return Path(out) / "frames"


def marker_path(out: str | os.PathLike, video_id: str) -> Path:
    """``{out}/.prepare/{video_id}.json``, written when every output of the clip is in place."""
    return Path(out) / MARKER_DIR / f"{video_id}.json"


def output_paths(out: str | os.PathLike, video_id: str, options: Options) -> list[Path]:
    """Every file a prepared clip has: the wav and one JPEG per frame slot."""
    frames = str(frames_dir(out))
    return [wav_path(out, video_id)] + [
        Path(frame_path(frames, video_id, k)) for k in frame_slots(options.seconds)
    ]


def _temp_name(path: Path) -> Path:
    # A fixed name: one worker writes a clip at a time, and a re-run overwrites a leftover.
    return path.with_name(f".{path.name}.tmp")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _source_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"source": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def done_result(clip: Clip, out: str | os.PathLike, options: Options) -> ClipResult | None:
    """The clip's earlier result if it is done with these options and this source, else None."""
    try:
        marker = json.loads(marker_path(out, clip.video_id).read_text(encoding="utf-8"))
        stamp = _source_stamp(clip.path)
    except (OSError, ValueError):
        return None
    if {k: marker.get(k) for k in stamp} != stamp or marker.get("options") != asdict(options):
        return None
    if not all(p.is_file() for p in output_paths(out, clip.video_id, options)):
        return None
    warnings = [tuple(w) for w in marker.get("warnings", [])]
    return ClipResult(clip.video_id, clip.path, "skipped", warnings=warnings)


@dataclass
class DecodedClip:
    """A clip's decoded media, cut to the clip length."""

    audio: np.ndarray  # (channels, samples) float32 at audio_rate
    audio_rate: int
    frames: dict[int, object]  # frame slot k -> av.VideoFrame on screen at k + 0.5 s
    video_seconds: float  # how long the decoded video lasts (at most options.seconds)
    error: str | None  # the decode error that ended decoding early, if any


def decode_clip(path: str, seconds: float) -> DecodedClip:
    """Decode the first ``seconds`` of a video file's first audio and video streams (PyAV).

    Raises ``ClipFailure`` for a file that does not open, lacks a stream or has no timestamps;
    a decode error part-way stops decoding and is returned in ``error``.
    """
    import av

    if not os.path.isfile(path):
        raise ClipFailure("missing_video", f"{path}: no such file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as e:
        raise ClipFailure("unreadable", f"{path}: cannot open as a media container ({e})") from e
    with container:
        if not container.streams.video:
            raise ClipFailure("no_video", f"{path}: no video stream")
        if not container.streams.audio:
            raise ClipFailure("no_audio", f"{path}: no audio stream (EquiAV needs both)")
        vstream, astream = container.streams.video[0], container.streams.audio[0]
        vstream.codec_context.thread_count = 1  # parallelism comes from the worker processes
        slots = frame_slots(seconds)
        targets = [k + FRAME_OFFSET_S for k in slots]
        chosen: dict[int, object] = {}
        resampler = av.AudioResampler(format="fltp")  # keeps the layout and the rate
        chunks: list[np.ndarray] = []
        rate, got = 0, 0
        first_pts = None
        last_frame, last_t, step = None, 0.0, 0.0
        video_done = audio_done = False
        error = None
        try:
            for packet in container.demux(vstream, astream):
                is_video = packet.stream.index == vstream.index
                if (video_done if is_video else audio_done) and packet.size:
                    continue
                for frame in packet.decode():
                    if is_video:
                        if video_done:
                            continue
                        if frame.pts is None:
                            raise ClipFailure("no_timestamps", f"{path}: video frames carry no pts")
                        if first_pts is None:
                            first_pts = frame.pts
                        t = float((frame.pts - first_pts) * frame.time_base)
                        # Slots before t show the previous frame (the last one at or before).
                        while len(chosen) < len(slots) and t > targets[len(chosen)] + TIME_EPS_S:
                            chosen[slots[len(chosen)]] = last_frame
                        if t >= seconds:
                            video_done = True
                            continue
                        if last_frame is not None:
                            step = t - last_t
                        last_frame, last_t = frame, t
                    else:
                        rate = frame.sample_rate
                        for f in resampler.resample(frame):
                            chunks.append(f.to_ndarray())
                            got += f.samples
                        # A tenth of a second beyond the clip feeds the resampler's filter.
                        audio_done = got >= math.ceil((seconds + 0.1) * rate)
                if video_done and audio_done:
                    break
        except av.FFmpegError as e:
            error = f"{type(e).__name__}: {e}"
        try:
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
        except av.FFmpegError:
            pass
    if last_frame is None:
        raise ClipFailure("too_short", f"{path}: no video frame decodes" + _because(error))
    for k in slots[len(chosen) :]:
        chosen[k] = last_frame  # past the video's end: its last frame (frame_index_at clamps)
    if not step:
        rate_guess = vstream.average_rate
        step = 1.0 / float(rate_guess) if rate_guess else 0.0
    video_seconds = seconds if video_done else min(seconds, last_t + step)
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    return DecodedClip(audio.astype(np.float32, copy=False), rate, chosen, video_seconds, error)


def _because(error: str | None) -> str:
    return f" (decoding stopped: {error})" if error else ""


def mono_16k(audio: np.ndarray, rate: int, seconds: float, first_channel: bool) -> np.ndarray:
    """Downmix (mean of channels, or channel 0), resample to 16 kHz, cut to ``seconds``."""
    import torch

    from kernels.resample import resample

    mono = audio[0] if first_channel else audio.mean(axis=0)
    out = resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, SAMPLE_RATE).numpy()
    return out[: int(round(seconds * SAMPLE_RATE))]


def to_int16(wave_: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to 16-bit PCM (scaled by 32767, rounded, clipped)."""
    return np.clip(np.round(wave_.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write mono int16 samples as a RIFF/WAVE file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())


def frame_image(frame, max_short_side: int, center_crop: bool):
    """A decoded frame as the PIL image stored: RGB, shorter side <= max, centre square.

    Resize and crop follow torchvision's ``Resize(max_short_side)`` (long side
    ``int(max * long / short)``, bilinear) and ``CenterCrop`` (offsets rounded half to even),
    as CAV-MAE's frame extraction applies them.
    """
    from PIL import Image

    image = frame.to_image() if not isinstance(frame, Image.Image) else frame
    image = image.convert("RGB")
    w, h = image.size
    short = min(w, h)
    if max_short_side and short > max_short_side:
        long = max(w, h)
        new_long = int(max_short_side * long / short)
        size = (max_short_side, new_long) if w <= h else (new_long, max_short_side)
        image = image.resize(size, Image.Resampling.BILINEAR)
        w, h = image.size
    if center_crop and w != h:
        side = min(w, h)
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        image = image.crop((left, top, left + side, top + side))
    return image


def prepare_clip(clip: Clip, out: str, options: Options) -> ClipResult:
    """Prepare one clip (or find it done); never raises for a bad clip."""
    done = done_result(clip, out, options)
    if done is not None:
        return done
    marker = marker_path(out, clip.video_id)
    try:
        marker.unlink(missing_ok=True)  # outputs are about to change: not done until rewritten
        warnings = _prepare_media(clip, out, options)
        record = {
            **_source_stamp(clip.path),
            "options": asdict(options),
            "labels": list(clip.labels),
            "warnings": [list(w) for w in warnings],
        }
        _write_atomic(marker, lambda p: p.write_text(json.dumps(record), encoding="utf-8"))
    except ClipFailure as e:
        return ClipResult(clip.video_id, clip.path, "failed", e.kind, e.message)
    except OSError as e:
        return ClipResult(clip.video_id, clip.path, "failed", "write_error", f"{clip.path}: {e}")
    except Exception as e:  # a bad file must not stop a run over millions: name it and go on
        msg = f"{clip.path}: {type(e).__name__}: {e}"
        return ClipResult(clip.video_id, clip.path, "failed", "error", msg)
    return ClipResult(clip.video_id, clip.path, "prepared", warnings=warnings)


def _prepare_media(clip: Clip, out: str, options: Options) -> list[tuple[str, str]]:
    """Decode, check lengths, write the wav and the frames; returns the clip's warnings."""
    seconds = options.seconds
    decoded = decode_clip(clip.path, seconds)
    rate = decoded.audio_rate or SAMPLE_RATE
    # Lengths are checked before resampling, which loads torch: failing clips stay cheap.
    audio_seconds = min(seconds, decoded.audio.shape[1] / rate)
    for name, length in (("audio", audio_seconds), ("video", decoded.video_seconds)):
        if length < MIN_SECONDS:
            raise ClipFailure(
                "too_short",
                f"{clip.path}: {length:.2f} s of {name} decodes (need {MIN_SECONDS:g} s)"
                + _because(decoded.error),
            )
    warnings: list[tuple[str, str]] = []
    if decoded.error:
        warnings.append(("decode_error", f"{clip.path}: decoding stopped early: {decoded.error}"))
    if audio_seconds < seconds - SHORT_TOLERANCE_S:
        warnings.append(
            ("short_audio", f"{clip.path}: audio ends at {audio_seconds:.2f} s of {seconds:g}")
        )
    if decoded.video_seconds < seconds - SHORT_TOLERANCE_S:
        late = [k for k in frame_slots(seconds) if k + FRAME_OFFSET_S > decoded.video_seconds]
        repeat = f"; frame_{late[0]}..frame_{late[-1]} repeat its last frame" if late else ""
        warnings.append(
            (
                "short_video",
                f"{clip.path}: video ends at {decoded.video_seconds:.2f} s of {seconds:g}{repeat}",
            )
        )
    samples = to_int16(mono_16k(decoded.audio, rate, seconds, options.first_channel))
    _write_atomic(wav_path(out, clip.video_id), lambda p: write_wav(p, samples))
    images: dict[int, object] = {}  # id(frame) -> image: a repeated frame is converted once
    frames = str(frames_dir(out))
    for k, frame in decoded.frames.items():
        if id(frame) not in images:
            images[id(frame)] = frame_image(frame, options.max_short_side, options.center_crop)
        image = images[id(frame)]
        _write_atomic(
            Path(frame_path(frames, clip.video_id, k)),
            lambda p, im=image: im.save(p, format="JPEG", quality=options.jpeg_quality),
        )
    return warnings


def _prepare_chunk(clips: Sequence[Clip], out: str, options: Options) -> list[ClipResult]:
    return [prepare_clip(c, out, options) for c in clips]


def _init_worker() -> None:
    # The pool parallelises over clips: one thread per worker. Set before torch loads (lazily,
    # for the first clip that needs resampling), so that a resumed run never loads it.
    os.environ["OMP_NUM_THREADS"] = "1"


def _run_clips(
    clips: Sequence[Clip], out: str, options: Options, workers: int, progress: bool
) -> list[ClipResult]:
    """Prepare every clip, in this process or a spawned pool; results in ``clips`` order."""
    from tqdm import tqdm

    results: list[ClipResult | None] = [None] * len(clips)
    with tqdm(total=len(clips), desc="prepare", unit="clip", disable=not progress) as bar:
        if workers <= 1 or len(clips) <= 1:
            for i, clip in enumerate(clips):
                results[i] = prepare_clip(clip, out, options)
                bar.update()
            return results  # type: ignore[return-value]
        starts = iter(range(0, len(clips), CHUNK))
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            pending: dict[Future, int] = {}

            def submit() -> None:
                start = next(starts, None)
                if start is not None:
                    chunk = list(clips[start : start + CHUNK])
                    pending[pool.submit(_prepare_chunk, chunk, out, options)] = start

            for _ in range(4 * workers):  # bounded: a few chunks per worker in flight
                submit()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    start = pending.pop(future)
                    chunk_results = future.result()
                    results[start : start + len(chunk_results)] = chunk_results
                    bar.update(len(chunk_results))
                    submit()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def prepare(
    videos: str | os.PathLike | None,
    labels_csv: str | os.PathLike,
    out: str | os.PathLike,
    *,
    label_csv: str | os.PathLike | None = None,
    json_name: str = "data.json",
    options: Options | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Prepare the clips of ``labels_csv`` found in ``videos`` into ``out`` (module docstring).

    ``videos`` None uses the paths of a ``path,labels`` CSV. Writes the wavs, frames, dataset
    JSON, vocabulary, weights and ``prepare_report.json``; returns the report.
    Raises ``PrepareError`` when an input file cannot be used at all.
    """
    options = options or Options()
    out = Path(out).resolve()
    labels_csv = str(Path(labels_csv).resolve())
    fmt, rows = read_label_rows(labels_csv)
    if videos is None and fmt != "path":
        raise PrepareError(f"{labels_csv}: an AudioSet CSV names no files; give the videos")
    video_files = find_videos(videos) if videos is not None else None
    vocab_set = read_label_csv(label_csv) if label_csv is not None else build_vocabulary(rows)
    if len(vocab_set) == 0:
        raise PrepareError(f"{labels_csv}: no labels to build a vocabulary from")
    vocab = Vocabulary(vocab_set)
    matched, unlisted = match_clips(video_files, rows, vocab, labels_csv)

    for sub in ["wav", MARKER_DIR] + [f"frames/frame_{k}" for k in frame_slots(options.seconds)]:
        (out / sub).mkdir(parents=True, exist_ok=True)
    clips = [m for m in matched if isinstance(m, Clip)]
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    done = iter(_run_clips(clips, str(out), options, workers, progress))
    results = [next(done) if isinstance(m, Clip) else m for m in matched]

    labels_of = {c.video_id: c.labels for c in clips}
    entries = [
        Entry(
            video_id=r.video_id,
            wav=str(wav_path(out, r.video_id)),
            video_path=str(frames_dir(out)),
            labels=labels_of[r.video_id],
        )
        for r in results
        if r.status in ("prepared", "skipped")
    ]
    json_path = out / json_name
    write_dataset(json_path, entries)
    write_label_csv(out / "class_labels_indices.csv", vocab_set.mids, vocab_set.names)
    write_weights(out / "weights.csv", compute_weights([e.labels for e in entries]))
    report = PrepareReport(str(out), str(json_path), results, unlisted, options)
    _write_atomic(
        out / REPORT_NAME,
        lambda p: p.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8"),
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit code 0 when the dataset has clips, 1 when none, 2 on bad input."""
    p = argparse.ArgumentParser(
        prog="python -m equiav.data.prepare",
        description="Decode raw videos into wavs, CAV-MAE frames and a dataset JSON.",
    )
    p.add_argument("videos", nargs="?", help="folder of videos (recursive) or a list file")
    p.add_argument("--labels", required=True, help="AudioSet segments CSV or path,labels CSV")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label-csv", help="class_labels_indices.csv (default: built from labels)")
    p.add_argument("--json-name", default="data.json")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--max-short-side", type=int, default=224, help="0 keeps the decoded size")
    p.add_argument("--no-center-crop", action="store_true", help="keep the whole frame")
    p.add_argument("--first-channel", action="store_true", help="channel 0, not the mean")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        options = Options(
            seconds=args.seconds,
            jpeg_quality=args.jpeg_quality,
            max_short_side=args.max_short_side,
            center_crop=not args.no_center_crop,
            first_channel=args.first_channel,
        )
        report = prepare(
            args.videos,
            args.labels,
            args.out,
            label_csv=args.label_csv,
            json_name=args.json_name,
            options=options,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (PrepareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    print(f"report: {Path(report.out) / REPORT_NAME}", file=sys.stderr)
    return 0 if report.counts()["in_dataset"] else 1


if __name__ == "__main__":
    sys.exit(main())
