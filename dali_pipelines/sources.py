"""Which sample each rank reads, in which order, and the bytes it reads (no decoding here).

The order of an epoch is a pure function of ``(seed, epoch)``, so that every rank computes the same
global permutation without talking to the others, and a resumed run can recompute it:

- ``train``: the global permutation of the usable entries (or, with class-balanced sampling, as many
  weighted draws with replacement as there are entries) is cut into global batches of
  ``batch_size * world_size``; rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of it. The last
  incomplete global batch is dropped (a different part each epoch, since the order is reshuffled).
  ``start_offset`` skips the first positions of the first epoch: a run resumed with another world
  size continues from the global position where the old run stopped.
- ``eval``: every entry exactly once, in file order, rank ``r`` taking entries ``r, r + W, ...``;
  each rank's list is padded to the same whole number of batches with ``valid = 0`` rows, which the
  loader drops, so that padding never reaches the metrics and every rank runs the same steps.

The source is a per-sample ``fn.external_source`` callback (a function of ``SampleInfo`` only),
which DALI's pipeline checkpointing resumes at the saved epoch and iteration.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from equiav.data.index import Entry, LabelSet

log = logging.getLogger(__name__)

# Seed streams: one integer per purpose, so that the order and the frame draws never share draws.
_ORDER_STREAM = 0x5EED0
_FRAME_STREAM = 0xF4A3E


@dataclass(frozen=True)
class Shard:
    """This process's part of the data: ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")


def epoch_order(
    n: int, seed: int, epoch: int, weights: np.ndarray | None = None, shuffle: bool = True
) -> np.ndarray:
    """The global sample order of one training epoch (positions into the usable entries)."""
    rng = np.random.default_rng([_ORDER_STREAM, seed, epoch])
    if weights is not None:
        p = np.asarray(weights, np.float64)
        return rng.choice(n, size=n, replace=True, p=p / p.sum())
    return rng.permutation(n) if shuffle else np.arange(n)


def train_positions(
    n: int,
    batch_size: int,
    shard: Shard,
    seed: int,
    epoch: int,
    weights: np.ndarray | None = None,
    start_offset: int = 0,
) -> np.ndarray:
    """Entry positions rank ``shard.rank`` reads in ``epoch``, a whole number of batches long."""
    order = epoch_order(n, seed, epoch, weights)[start_offset:]
    global_batch = batch_size * shard.world_size
    usable = len(order) // global_batch * global_batch
    return order[:usable][shard.rank :: shard.world_size]


def eval_positions(n: int, batch_size: int, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """(positions, valid) for evaluation: each entry once, padded to whole, equal batch counts."""
    mine = np.arange(shard.rank, n, shard.world_size)
    per_rank = -(-n // shard.world_size)
    padded = max(1, -(-per_rank // batch_size)) * batch_size
    valid = np.zeros(padded, np.int32)
    valid[: len(mine)] = 1
    pad_with = mine[0] if len(mine) else 0
    return np.concatenate([mine, np.full(padded - len(mine), pad_with, mine.dtype)]), valid


def frame_draw(seed: int, epoch: int, position: int, view: int, frames: int) -> int:
    """Frame index k for one view of one sample, a pure function of where the sample is read.

    The frame decides which file (frames layout) or which part of a video is read, so it is drawn
    here, before reading, from a counter-based generator rather than by ``fn.random`` inside the
    pipeline: this keeps it seeded and exactly resumable without reading all ten frames.
    """
    rng = np.random.default_rng([_FRAME_STREAM, seed, epoch, position, view])
    return int(rng.integers(frames))


class CorruptMediaError(ValueError):
    """A media file's bytes are not a decodable file of its kind; the message names the file."""


def read_bytes(path: str) -> np.ndarray:
    """A file's bytes as a uint8 array (``FileNotFoundError`` names the file)."""
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def validate_wav(path: str, data: np.ndarray) -> tuple[int, int]:
    """Cheap structural check of a RIFF/WAVE file's bytes; returns (sample rate, channels).

    Catches what a header-only scan can miss when a file changes mid-epoch: garbage, a truncated
    data chunk, a missing ``fmt`` chunk, so a broken file never reaches a decoder.
    """
    b = data.tobytes()
    if len(b) < 12 or b[:4] != b"RIFF" or b[8:12] != b"WAVE":
        raise CorruptMediaError(f"{path}: not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(b):
        cid, size = b[pos : pos + 4], struct.unpack("<I", b[pos + 4 : pos + 8])[0]
        if cid == b"fmt " and size >= 16 and pos + 24 <= len(b):
            channels, rate = struct.unpack("<HI", b[pos + 10 : pos + 16])
            fmt = (rate, channels)
        if cid == b"data":
            if fmt is None or fmt[0] == 0 or fmt[1] == 0:
                raise CorruptMediaError(f"{path}: no valid fmt chunk before the data chunk")
            if pos + 8 + size > len(b):
                raise CorruptMediaError(
                    f"{path}: truncated ({len(b) - pos - 8} of {size} data bytes present)"
                )
            return fmt
        pos += 8 + size + (size & 1)
    raise CorruptMediaError(f"{path}: no data chunk")


def read_wav(path: str, sample_rate: int = 16000) -> np.ndarray:
    """A wav file's bytes, checked, and resampled to ``sample_rate`` if it has another rate.

    Resampling happens here, with ``kernels.resample``, because DALI's decoder aliases when it
    downsamples (see that module). The result is re-encoded as a float32 wav in memory;
    channels are kept (the pipeline downmixes).
    """
    data = read_bytes(path)
    rate, _channels = validate_wav(path, data)
    if rate == sample_rate:
        return data
    import io

    import soundfile
    import torch

    from kernels.resample import resample

    x, _ = soundfile.read(io.BytesIO(data.tobytes()), dtype="float32", always_2d=True)
    y = resample(torch.from_numpy(np.ascontiguousarray(x.T)), rate, sample_rate).T.numpy()
    out = io.BytesIO()
    soundfile.write(out, y, sample_rate, format="WAV", subtype="FLOAT")
    return np.frombuffer(out.getvalue(), np.uint8)


def validate_jpeg(path: str, data: np.ndarray) -> None:
    """A JPEG starts with SOI and ends with EOI; a truncated file lacks the end marker."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise CorruptMediaError(f"{path}: not a JPEG file")
    if data[-2] != 0xFF or data[-1] != 0xD9:
        raise CorruptMediaError(f"{path}: truncated JPEG (no end-of-image marker)")


@dataclass
class SourceSpec:
    """Everything a source callback needs, kept picklable for DALI's parallel external source."""

    entries: Sequence[Entry]
    labels: LabelSet
    batch_size: int
    shard: Shard
    mode: str  # "train" or "eval"
    seed: int = 0
    frames_per_clip: int = 10
    eval_frame: int = 5
    views: int = 1  # visual views read per sample (pretraining reads two frames)
    weights: np.ndarray | None = None
    start_epoch: int = 0
    start_offset: int = 0


class SampleSource:
    """Per-sample ``fn.external_source`` callback: wav bytes, frame bytes, labels and bookkeeping.

    Outputs per sample, in order: wav bytes, then per visual view the encoded frame bytes (a JPEG,
    or a video file followed by the frame number to decode), the multi-hot label vector, the entry
    index, the ``valid`` flag and the frame second k of each view. ``num_outputs`` counts them.

    A file that is missing or structurally broken when it is read is logged by name and replaced by
    the next readable entry of the epoch (``valid`` = 0 in eval mode), so one bad file never stops a
    run; ``skipped`` counts them in this process.
    """

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.multi_hot = np.stack([spec.labels.multi_hot(e.labels) for e in spec.entries])
        self.skipped: dict[str, str] = {}
        self._positions: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry positions, valid flags) this rank reads in ``epoch`` (DALI's epoch counter)."""
        if epoch not in self._positions:
            s, n = self.spec, len(self.spec.entries)
            if s.mode == "eval":
                pos, valid = eval_positions(n, s.batch_size, s.shard)
            else:
                offset = s.start_offset if epoch == 0 else 0
                pos = train_positions(
                    n, s.batch_size, s.shard, s.seed, s.start_epoch + epoch, s.weights, offset
                )
                valid = np.ones(len(pos), np.int32)
            self._positions = {epoch: (pos, valid)}  # keep one epoch: lists can be long
        return self._positions[epoch]

    def __len__(self) -> int:
        return len(self.epoch_positions(0)[0])

    @property
    def video_files(self) -> bool:
        """True when the entries name video files (all of them do, or none)."""
        return self.spec.entries[0].is_video_file

    @property
    def num_outputs(self) -> int:
        return 1 + self.spec.views * (2 if self.video_files else 1) + 4

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        pos, valid = self.epoch_positions(info.epoch_idx)
        i = info.idx_in_epoch
        if i >= len(pos):
            raise StopIteration
        index, ok = int(pos[i]), int(valid[i])
        for attempt in range(len(self.spec.entries)):
            try:
                return self._read(index, ok, self.spec.start_epoch + info.epoch_idx, i)
            except (OSError, CorruptMediaError) as e:
                self._skip(self.spec.entries[index], e)
                index = int(pos[(i + attempt + 1) % len(pos)])
                ok = 0 if self.spec.mode == "eval" else ok
        last = next(reversed(self.skipped.values()))
        raise RuntimeError(f"no readable entry left in this shard; last error: {last}")

    def _skip(self, entry: Entry, err: Exception) -> None:
        if entry.video_id not in self.skipped:
            self.skipped[entry.video_id] = str(err)
            log.warning(
                "skipping %s (%d skipped so far in this process): %s",
                entry.video_id,
                len(self.skipped),
                err,
            )

    def _read(self, index: int, ok: int, epoch: int, i: int) -> tuple[np.ndarray, ...]:
        s, entry = self.spec, self.spec.entries[index]
        out: list[np.ndarray] = [read_wav(entry.wav)]
        ks = []
        for view in range(s.views):
            if s.mode == "eval":
                k = s.eval_frame
            else:
                k = frame_draw(
                    s.seed, epoch, self._global_position(epoch, i), view, s.frames_per_clip
                )
            ks.append(k)
            out += self._read_frame(entry, k)
        out += [
            self.multi_hot[index],
            np.array(index, np.int64),
            np.array(ok, np.int32),
            np.array(ks, np.int32),
        ]
        return tuple(out)

    def _global_position(self, epoch: int, i: int) -> int:
        # Position in the epoch's global order, the same whatever the world size, so that a run
        # resumed on another number of processes draws the same frames for the same samples.
        s = self.spec
        offset = s.start_offset if epoch == s.start_epoch else 0
        return offset + i * s.shard.world_size + s.shard.rank

    def _read_frame(self, entry: Entry, k: int) -> list[np.ndarray]:
        if entry.is_video_file:
            from dali_pipelines.video import frame_index_at

            frame = frame_index_at(entry.video_path, k + 0.5)
            return [read_bytes(entry.video_path), np.array(frame, np.int32)]
        path = entry.frame_path(k)
        data = read_bytes(path)
        validate_jpeg(path, data)
        return [data]
