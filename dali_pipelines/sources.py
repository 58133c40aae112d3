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
which DALI's pipeline checkpointing resumes at the saved epoch and iteration. It hands DALI few
outputs: the media (a waveform, JPEG or video bytes) one each, and every small fixed-size number
(labels, bookkeeping, draws) packed into one float64 vector, ``meta`` (``SampleSource.meta_layout``;
float64 holds every float32 and every integer below 2**53 exactly). Why: DALI's main-process cost
of feeding a batch grows with outputs times samples (~0.1-0.2 ms per output per batch of 16 on
the 2-core VM; the pretraining source went from 14 outputs to 4: 6.4 -> 3.1 ms of main-thread
time per batch with the source in 2 workers), and on a GPU that is host time taken from the
training step.

Bytes come from ``equiav.data.media``: a file, or a member of a WebDataset shard read at its
indexed offset (``equiav.data.shard``), so every mode reads both layouts, in the same order.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from equiav.data.index import Entry, LabelRows, LabelSet
from equiav.data.media import CorruptMediaError, store  # the error is raised by the checks here

log = logging.getLogger(__name__)

# Seed streams: one integer per purpose, so that the order and the frame draws never share draws.
_ORDER_STREAM = 0x5EED0
# Draw sizes of the packed outputs (see SampleSource.meta_layout).
_A_PARAMS = 6  # pretraining audio: roll, crop (i, j, h, w), time shift
_FT_PARAMS = 5  # finetuning: roll, time mask [t0, t1), frequency mask [f0, f1)


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


def frame_draws(seed: int, epoch: int, position: int, views: int, frames: int) -> list[int]:
    """Frame index k of each view of one sample (independent, uniform over the clip's frames),
    a pure function of where the sample is read.

    The frame decides which file (frames layout) or which part of a video is read, so it is drawn
    here, before reading, from a counter-based generator rather than by ``fn.random`` inside the
    pipeline: this keeps it seeded and exactly resumable without reading all ten frames.
    """
    return frame_draws_block(seed, epoch, [position], views, frames)[0].tolist()


def frame_draws_block(seed: int, epoch: int, positions, views: int, frames: int) -> np.ndarray:
    """:func:`frame_draws` of several positions at once: (len(positions), views) int64."""
    from dali_pipelines.augment import SampleRNG

    rng = SampleRNG(seed, epoch, positions, "frames")
    return rng.integers(frames, size=(len(positions), views))


def read_bytes(path: str) -> np.ndarray:
    """A file's or shard member's bytes as a uint8 array (``equiav.data.media``; a
    ``FileNotFoundError`` names the file, a ``CorruptMediaError`` a truncated shard)."""
    return store().read(path)


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


def jpeg_size(path: str, data: np.ndarray) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame segment, without decoding."""
    b, pos = data.tobytes(), 2
    while pos + 4 <= len(b):
        if b[pos] != 0xFF:
            raise CorruptMediaError(f"{path}: corrupt JPEG marker at byte {pos}")
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        size = struct.unpack(">H", b[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", b[pos + 5 : pos + 9])
            return h, w
        pos += 2 + size
    raise CorruptMediaError(f"{path}: JPEG without a frame header")


MODES = ("eval", "train", "pretrain", "finetune")


@dataclass
class SourceSpec:
    """Everything a source callback needs, kept picklable for DALI's parallel external source.

    ``mode``: ``eval`` (every entry once, frame ``eval_frame``), ``train`` (seeded order, a random
    frame), ``pretrain`` (two frame draws and the augmentation draws of ``augment``) or
    ``finetune`` (a mixup partner, the clean-fbank roll and SpecAugment draws).
    """

    entries: Sequence[Entry]
    labels: LabelSet
    batch_size: int
    shard: Shard
    mode: str = "train"
    seed: int = 0
    frames_per_clip: int = 10
    eval_frame: int = 5
    weights: np.ndarray | None = None
    start_epoch: int = 0
    start_offset: int = 0
    augment: object | None = None  # equiav.config.AugmentConfig for pretrain/finetune
    frames: int = 1024  # fbank frames T after pad/cut
    bins: int = 128  # mel bins F
    image_size: int = 224
    cen_num: int = 0  # sampled-but-not-applied vectors per modality (pretrain, cen_mean)
    ft_specaug: bool = True  # finetune SpecAugment (paper_exact: off)
    # Send video views as IVF excerpts that start at keyframes (video.video_excerpt): for DALI's
    # CPU decoder, which otherwise decodes every file from its start.
    video_excerpt: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown source mode {self.mode!r}; expected one of {MODES}")
        if self.mode in ("pretrain", "finetune") and self.augment is None:
            raise ValueError(f"mode {self.mode!r} needs the augmentation config")


class SampleSource:
    """Per-sample ``fn.external_source`` callback: file bytes, labels, draws and bookkeeping.

    Its outputs are named (``output_names``, in order): ``wav``; per visual view ``frame{v}`` (JPEG
    bytes, or video bytes followed by ``frame{v}_index``, the frame number to decode; pretraining
    on video files sends the file once, ``frame0``, since both views are frames of it); ``labels``
    (multi-hot, mixed in finetune mode), ``index``, ``valid``, ``frame_k``, ``skipped``; then the
    mode's draws (see ``_draws``).

    A file that is missing or structurally broken when it is read is logged by name and replaced by
    the next readable entry of the epoch (``valid`` = 0 in eval mode), so one bad file never stops a
    run. The ``skipped`` output carries the failed entry's index (-1: none), so that the loader
    counts skips also when this callback runs in DALI's worker processes; the attribute
    ``skipped`` (video id -> reason) holds those of this process.
    """

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.label_rows = LabelRows.build(spec.entries, spec.labels)
        self.skipped: dict[str, str] = {}
        self._positions: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: dict[tuple, object] = {}  # see _block

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
    def views(self) -> int:
        """Frames read per sample: two in pretraining (clean and augmented) and finetuning
        (the sample's and its mixup partner's), else one."""
        return 2 if self.spec.mode in ("pretrain", "finetune") else 1

    @property
    def output_names(self) -> tuple[str, ...]:
        """The logical outputs of a sample (``sample``'s keys), in order."""
        names = ["wav"]
        for v in range(self.views):
            if not self.video_files:
                names += [f"frame{v}"]
            elif self._same_file(v):
                names += [f"frame{v}_index"]
            else:
                names += [f"frame{v}", f"frame{v}_index"]
        names += ["labels", "index", "valid", "frame_k", "skipped"]
        if self.spec.mode == "pretrain":
            names += ["vcrop", "t_a", "t_v", "a_params"]
            if self.spec.cen_num > 0:
                names += ["t_a_cen", "t_v_cen"]
        elif self.spec.mode == "finetune":
            names += ["wav_partner", "lam", "ft_params"]
        return tuple(names)

    @functools.cached_property
    def feed_names(self) -> tuple[str, ...]:
        """What the callback hands DALI, in order: the media outputs, then ``meta``."""
        media = [n for n in self.output_names if n not in self.meta_layout]
        return (*media, "meta")

    @functools.cached_property
    def meta_layout(self) -> dict[str, tuple[int, tuple[int, ...], type]]:
        """name -> (offset, per-sample shape, dtype) of each output packed into ``meta``. The
        ones DALI's graph reads (frame indices, the crop, lambda) come first."""
        from dali_pipelines.augment import T_A, T_V

        s = self.spec
        fields: list[tuple[str, tuple[int, ...], type]] = []
        if self.video_files:
            fields += [(f"frame{v}_index", (), np.int32) for v in range(self.views)]
        if s.mode == "pretrain":
            fields.append(("vcrop", (4,), np.int32))
        if s.mode == "finetune":
            fields.append(("lam", (), np.float32))
        fields += [
            ("labels", (self.label_rows.num_classes,), np.float32),
            ("index", (), np.int64),
            ("valid", (), np.int32),
            ("frame_k", (self.views,), np.int32),
            ("skipped", (), np.int64),
        ]
        if s.mode == "pretrain":
            fields += [("t_a", (T_A,), np.float32), ("t_v", (T_V,), np.float32)]
            fields.append(("a_params", (_A_PARAMS,), np.int32))
            if s.cen_num > 0:
                fields += [("t_a_cen", (s.cen_num, T_A), np.float32)]
                fields += [("t_v_cen", (s.cen_num, T_V), np.float32)]
        elif s.mode == "finetune":
            fields.append(("ft_params", (_FT_PARAMS,), np.int32))
        layout, offset = {}, 0
        for name, shape, dtype in fields:
            layout[name] = (offset, shape, dtype)
            offset += int(np.prod(shape, dtype=np.int64))
        return layout

    @functools.cached_property
    def meta_size(self) -> int:
        """Length of a sample's ``meta`` vector."""
        offset, shape, _ = next(reversed(self.meta_layout.values()))
        return offset + int(np.prod(shape, dtype=np.int64))

    def _pack(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """``meta``: the sample's packed outputs, checked against ``meta_layout``."""
        layout = self.meta_layout
        meta = np.empty(self.meta_size, np.float64)
        for name, (offset, shape, _) in layout.items():
            value = np.asarray(out[name])
            if value.shape != shape:
                raise ValueError(f"source output {name!r} has shape {value.shape}, not {shape}")
            meta[offset : offset + value.size] = value.reshape(-1)
        return meta

    def unpack(self, meta: np.ndarray) -> dict[str, np.ndarray]:
        """A batch's ``meta`` (B, M) -> name -> (B, *shape) arrays of their own dtypes."""
        meta = np.asarray(meta)
        if meta.ndim != 2 or meta.shape[1] != self.meta_size:
            raise ValueError(f"meta must have shape (B, {self.meta_size}), got {meta.shape}")
        rows = meta.shape[0]
        out = {}
        for name, (offset, shape, dtype) in self.meta_layout.items():
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = meta[:, offset : offset + size].astype(dtype).reshape(rows, *shape)
        return out

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        """DALI's callback: ``feed_names``' arrays of the sample at ``info``."""
        out = self.sample(info)
        meta = self._pack(out)
        return (*(out[name] for name in self.feed_names[:-1]), meta)

    def sample(self, info) -> dict[str, np.ndarray]:
        """The sample at ``info`` (``epoch_idx``, ``idx_in_epoch``): ``output_names``' arrays."""
        pos, valid = self.epoch_positions(info.epoch_idx)
        i = info.idx_in_epoch
        if i >= len(pos):
            raise StopIteration
        index, ok = int(pos[i]), int(valid[i])
        epoch = self.spec.start_epoch + info.epoch_idx
        failed = -1  # the entry this position should have read, if it broke
        for attempt in range(len(self.spec.entries)):
            try:
                out = self._read(index, ok, epoch, i)
                out["skipped"] = np.array(failed, np.int64)
                return out
            except (OSError, CorruptMediaError) as e:
                self._skip(self.spec.entries[index], e)
                failed = index if failed < 0 else failed
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

    def _global_position(self, epoch: int, i: int) -> int:
        # Position in the epoch's global order, the same whatever the world size, so that a run
        # resumed on another number of processes draws the same frames for the same samples.
        s = self.spec
        offset = s.start_offset if epoch == s.start_epoch else 0
        return offset + i * s.shard.world_size + s.shard.rank

    def _block(self, kind: str, epoch: int, i: int, draw, *key):
        """``draw(positions)``'s result for the batch-sized block of local positions around
        ``i``, computed once per block and ``key``, and ``i``'s place in it.

        The draws are vectorised over a block (``augment.SampleRNG``: a sample's numbers do not
        depend on the block), so the per-sample callback pays one block's numpy calls per batch
        instead of one sample's per sample."""
        size = self.spec.batch_size
        start = i - i % size
        cache_key = (kind, epoch, start, *key)
        if cache_key not in self._blocks:
            if len(self._blocks) > 16:  # a few kinds and sizes of the current block are enough
                self._blocks.clear()
            positions = [self._global_position(epoch, j) for j in range(start, start + size)]
            self._blocks[cache_key] = draw(positions)
        return self._blocks[cache_key], i - start

    def _read(self, index: int, ok: int, epoch: int, i: int) -> dict[str, np.ndarray]:
        s = self.spec
        entry = s.entries[index]
        out: dict[str, np.ndarray] = {"wav": read_wav(entry.wav)}
        partner = entry
        if s.mode == "finetune":
            out.update(self._mixup(index, epoch, i))
            partner = s.entries[int(out.pop("partner"))]
        if s.mode == "eval":
            ks = [s.eval_frame] * self.views
        else:
            ks, b = self._block(
                "frames",
                epoch,
                i,
                lambda p: frame_draws_block(s.seed, epoch, p, self.views, s.frames_per_clip),
            )
            ks = ks[b].tolist()
        clips = [partner if v == 1 and s.mode == "finetune" else entry for v in range(len(ks))]
        if entry.is_video_file:
            out.update(self._read_video(clips, ks))
        else:
            for view, (e, k) in enumerate(zip(clips, ks, strict=True)):
                path = e.frame_path(k)
                out[f"frame{view}"] = data = read_bytes(path)
                validate_jpeg(path, data)
        out.setdefault("labels", self.label_rows.row(index))
        out["index"] = np.array(index, np.int64)
        out["valid"] = np.array(ok, np.int32)
        out["frame_k"] = np.array(ks, np.int32)
        if s.mode == "pretrain":
            out.update(self._pretrain_draws(epoch, i, self._frame_size(entry, ks[1], out)))
        return out

    def _same_file(self, view: int) -> bool:
        """Whether a video view is decoded from view 0's bytes (pretraining: the same clip)."""
        return view > 0 and self.spec.mode == "pretrain"

    def _read_video(self, entries: list[Entry], ks: list[int]) -> dict[str, np.ndarray]:
        """Each view's video bytes (``frame{v}``; pretraining sends its one clip once) and the
        index of the frame to decode in them (``frame{v}_index``)."""
        from dali_pipelines.video import frames_at_seconds, video_excerpt

        groups = [[0, 1]] if self._same_file(1) else [[v] for v in range(len(ks))]
        out = {}
        for group in groups:
            path = entries[group[0]].video_path
            data = read_bytes(path)
            seconds = [ks[v] + 0.5 for v in group]
            try:
                index = frames_at_seconds(path, seconds, strict=True, data=data)
                if self.spec.video_excerpt:
                    data, index = video_excerpt(path, data, index)
            except CorruptMediaError:
                raise
            except ValueError as err:  # the probe: not a readable container (any more)
                raise CorruptMediaError(str(err)) from err
            out[f"frame{group[0]}"] = data
            for v, i in zip(group, index, strict=True):
                out[f"frame{v}_index"] = np.array(i, np.int32)
        return out

    @staticmethod
    def _frame_size(entry: Entry, k: int, out: dict) -> tuple[int, int]:
        """(height, width) of the augmented view's frame, which its crop is drawn against."""
        if entry.is_video_file:
            from dali_pipelines.video import frame_size

            return frame_size(entry.video_path)
        return jpeg_size(entry.frame_path(k), out["frame1"])

    def _pretrain_draws(self, epoch: int, i: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The augmented views' draws (t-vectors and what applies them) and the clean roll."""
        from dali_pipelines import augment

        s, aug = self.spec, self.spec.augment
        block, b = self._block(
            "pretrain",
            epoch,
            i,
            lambda positions: augment.draw_pretrain_block(
                s.seed,
                epoch,
                positions,
                aug,
                s.frames,
                s.bins,
                aug.time_mask,
                aug.freq_mask,
                size,
                s.image_size,
                s.cen_num,
            ),
            size,
        )
        d = block.sample(b)
        a, v = d.audio, d.visual
        roll = int(d.roll[0]) if aug.noise else 0
        draws = {
            "vcrop": v.crop[0].astype(np.int32),
            "t_a": a.t[0],
            "t_v": v.t[0],
            "a_params": np.array([roll, *a.crop[0], a.shift[0]], np.int32),
        }
        if s.cen_num > 0:
            draws["t_a_cen"], draws["t_v_cen"] = a.t[1:], v.t[1:]
        return draws

    def _mixup(self, index: int, epoch: int, i: int) -> dict[str, np.ndarray]:
        """Finetuning: the mixup partner (uniform over the dataset), lambda, mixed labels, the
        clean roll (``augment.noise``) and SpecAugment's masks (``augment.draw_finetune_block``,
        drawn per block)."""
        from dali_pipelines import augment

        s, aug = self.spec, self.spec.augment
        block, b = self._block(
            "finetune",
            epoch,
            i,
            lambda p: augment.draw_finetune_block(
                s.seed, epoch, p, aug, len(s.entries), s.frames, s.bins
            ),
        )
        mix, partner, lam = bool(block.mix[b]), int(block.partner[b]), float(block.lam[b])
        masks = block.masks[b].tolist()
        roll = int(block.roll[b]) if aug.noise else 0
        if not mix:
            partner, lam = index, 1.0
        if not s.ft_specaug:
            masks = [0, 0, 0, 0]
        labels = lam * self.label_rows.row(index) + (1 - lam) * self.label_rows.row(partner)
        return {
            "partner": np.array(partner),
            "wav_partner": read_wav(s.entries[partner].wav),
            "lam": np.array(lam, np.float32),
            "labels": labels.astype(np.float32),
            "ft_params": np.array([roll, *masks], np.int32),
        }
