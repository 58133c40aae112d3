"""The DALI iterator wrapped into what the trainer consumes: dicts of torch tensors on its device.

``DaliLoader`` owns one pipeline for one process (its shard of the data), runs the device stage
(the filterbank, see ``audio``) right after DALI's PyTorch iterator, drops eval padding rows, and
saves/restores its position:

- ``state_dict()`` holds the epoch and the global sample position reached in it. Every choice the
  pipeline makes is a pure function of (seed, epoch, global position) (see ``sources``), so a
  loader rebuilt from that state yields the same next batch, bit for bit. We resume by position
  rather than with DALI's pipeline checkpointing because DALI 2.4 cannot checkpoint its video
  decoder ("Checkpointing is not implemented for this operator: decoders.video"), and because a
  position also carries over to another world size: then the interrupted epoch continues at the
  same global position, re-sharded over the new processes (logged).
- Batches: ``audio`` (B, 3, 128, 1024) float32 (three equal channels, frequency as height, as the
  audio tower's patch grid expects), ``visual`` (B, 3, 224, 224), ``labels`` (B, C), ``index``
  (B,) entry indices into ``entries``, ``frame_k`` (B, views).
- Last-batch policy: training epochs are whole global batches (the incomplete tail of each
  reshuffled epoch is dropped); evaluation yields every sample exactly once (the padding rows of
  the last batch are removed here, so batches can be shorter than ``batch_size``).
- On a CPU the loader makes glibc keep freed memory for reuse (``keep_freed_memory``,
  ``data.keep_freed_memory``): process-wide, because the stage's batch-sized tensors would
  otherwise fault fresh pages in every batch.
- Bad input: the dataset is checked when the loader is built (``equiav.data.check``'s cached
  result); entries with errors are skipped, each logged with its file and counted; files that
  break mid-epoch are skipped by the source (logged by name, counted in ``skipped``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dali_pipelines import audio, augment
from dali_pipelines.pipelines import PipelineOptions, build_pipeline, output_names
from dali_pipelines.sources import SampleSource, Shard, SourceSpec
from equiav.data.index import Entry, EntryTable, LabelSet, is_video_file, read_label_csv
from kernels import augment as K
from kernels.fbank import BACKENDS as FBANK_BACKENDS
from kernels.transfer import to_device

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass
class LoaderConfig:
    """What a loader needs beyond the entries: sizes, normalisation, resources, seed."""

    batch_size: int
    mode: str = "train"  # "eval", "train", "pretrain" or "finetune" (see sources.SourceSpec)
    seed: int = 0
    audio_mean: float = -4.346
    audio_std: float = 4.332
    target_frames: int = audio.TARGET_FRAMES
    image_size: int = 224
    frames_per_clip: int = 10
    eval_frame: int = 5
    num_threads: int = 2
    prefetch: int = 2
    py_workers: int = 0
    weights: np.ndarray | None = field(default=None, repr=False)
    augment: object | None = None  # equiav.config.AugmentConfig (pretrain, finetune)
    cen_num: int = 0  # pretrain: sampled vectors per modality (0 without cen_mean)
    time_shift_applied: bool = True  # pretrain quirk switch (paper_exact: False)
    ft_specaug: bool = True  # finetune quirk switch (paper_exact: False)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    keep_freed_memory: bool = True  # CPU: see keep_freed_memory()
    # With a CUDA device, where video files are decoded: "gpu" (NVDEC) or "cpu" (DALI's CPU
    # decoder on keyframe excerpts, frames copied to the GPU); see video_decoder_for.
    video_decoder: str = "gpu"
    hw_decoder_load: float = 0.65  # GPU: JPEG frames to the hardware decoder (data.*)
    fbank_backend: str = "auto"  # the device stage's filterbank (data.*, kernels.fbank.BACKENDS)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves each large allocation (the device stage's batch-sized tensors on a
    CPU: 8 to 25 MB each) with a fresh mmap and unmaps it when freed, so every batch faults its
    memory in again, page by page (on the 2-core VM ~0.5 ms per MB: tens of ms per batch). With
    mmap off for the heap and the trim threshold at 1 GiB, freed blocks are reused. Process-wide
    and idempotent; a no-op returning False where the C library has no ``mallopt`` (not glibc).
    Measured: CPU pretraining loader ~+9 % samples/s (4 alternating process pairs, 3 of 4 won).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class DaliLoader:
    """Iterates over one epoch at a time; ``for batch in loader`` runs the next epoch."""

    def __init__(
        self,
        entries: Sequence[Entry],
        labels: LabelSet,
        cfg: LoaderConfig,
        shard: Shard | None = None,
        device: torch.device | str = "cpu",
        state: dict | None = None,
    ) -> None:
        if not entries:
            raise ValueError("no usable entries to load")
        paths = (
            entries.video_paths
            if isinstance(entries, EntryTable)
            else (e.video_path for e in entries)
        )
        kinds = {is_video_file(p) for p in set(paths)}
        if len(kinds) != 1:
            raise ValueError("a dataset must use video files or frames folders, not both")
        shard = shard or Shard()
        self.entries, self.labels, self.cfg, self.shard = entries, labels, cfg, shard
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cfg.video_decoder not in ("cpu", "gpu"):
            raise ValueError(f"video_decoder must be 'cpu' or 'gpu', got {cfg.video_decoder!r}")
        self._video_on_cpu = self.device.type == "cpu" or cfg.video_decoder == "cpu"
        # Finetuning's SpecAugment bands hold the log-mel's zero, normalised: masked before the
        # normalisation, where the original's recipe (and the paper-style loader) masks.
        self._mask_fill = audio.normalized_zero(cfg.audio_mean, cfg.audio_std)
        if cfg.fbank_backend not in FBANK_BACKENDS:
            raise ValueError(
                f"fbank_backend must be one of {FBANK_BACKENDS}, got {cfg.fbank_backend!r}"
            )
        if cfg.fbank_backend.startswith("triton") and self.device.type != "cuda":
            # Said here rather than by the kernel at the first batch, inside the device stage.
            raise ValueError(
                f"data.fbank_backend={cfg.fbank_backend} needs a CUDA device, the loader runs on "
                f"{self.device}: use auto or torch"
            )
        self.epoch, start_offset = 0, 0
        if state is not None:
            self.epoch, start_offset = self._resume(state)
        self.spec = SourceSpec(
            entries=entries,
            labels=labels,
            batch_size=cfg.batch_size,
            shard=shard,
            mode=cfg.mode,
            seed=cfg.seed,
            frames_per_clip=cfg.frames_per_clip,
            eval_frame=cfg.eval_frame,
            weights=cfg.weights,
            start_epoch=self.epoch,
            start_offset=start_offset,
            augment=cfg.augment,
            frames=cfg.target_frames,
            image_size=cfg.image_size,
            cen_num=cfg.cen_num if cfg.mode == "pretrain" else 0,
            ft_specaug=cfg.ft_specaug,
            # Only for DALI's CPU decoder: the GPU decoder seeks with its frame index already,
            # and has not been tried on IVF input.
            video_excerpt=self._video_on_cpu,
        )
        self.source = SampleSource(self.spec)
        if start_offset and len(self.source) == 0:
            # Saved right after the last batch of an epoch: resume at the next one.
            self.epoch, start_offset = self.epoch + 1, 0
            self.spec = dataclasses.replace(self.spec, start_epoch=self.epoch, start_offset=0)
            self.source = SampleSource(self.spec)
        if len(self.source) == 0:
            raise ValueError(
                f"{len(entries)} entries are fewer than one global batch "
                f"({cfg.batch_size} x {shard.world_size} processes)"
            )
        self.opts = PipelineOptions(
            batch_size=cfg.batch_size,
            num_threads=cfg.num_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
            prefetch=cfg.prefetch,
            # Every rank draws its own augmentations; a run's streams follow from its seed.
            seed=(cfg.seed * 7919 + shard.rank * 104729 + self.epoch) % (2**31),
            target_frames=cfg.target_frames,
            image_size=cfg.image_size,
            py_workers=cfg.py_workers,
            video_device="cpu" if self._video_on_cpu else "gpu",
            hw_decoder_load=cfg.hw_decoder_load,
        )
        self.pipe = build_pipeline(self.source, self.opts)
        # After the pipeline is built: starting source workers pickles the source (the whole
        # list) for each, and with freed memory kept those copies would stay in this process.
        if self.device.type == "cpu" and cfg.keep_freed_memory and keep_freed_memory():
            log.debug("glibc malloc keeps freed memory (data.keep_freed_memory)")
        self.iterator = DALIGenericIterator(
            [self.pipe],
            list(output_names(self.source)),
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=False,
            prepare_first_batch=False,
        )
        self._start_epoch = self.epoch
        self._start_offset = start_offset
        self.steps_done = 0  # batches consumed in the current epoch (after start_offset)
        self._skipped_ids: set[str] = set()  # from the batches' `skipped` output

    def _resume(self, state: dict) -> tuple[int, int]:
        """(epoch, global position in it) from a saved ``state_dict``."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state of version {state.get('version')}, need {STATE_VERSION}"
            )
        if state["world_size"] != self.shard.world_size:
            log.warning(
                "resuming with %d processes from a checkpoint of %d: epoch %d continues at global "
                "sample %d, re-sharded over the new processes",
                self.shard.world_size,
                state["world_size"],
                state["epoch"],
                state["global_position"],
            )
        return state["epoch"], state["global_position"]

    def __len__(self) -> int:
        """Batches per epoch for this process (the current epoch's, for a resumed first epoch)."""
        return len(self.source.epoch_positions(self.epoch - self._start_epoch)[0]) // (
            self.cfg.batch_size
        )

    @property
    def steps_per_epoch(self) -> int:
        """Batches in a whole epoch for this process (a resumed first epoch may be shorter)."""
        s = self.spec
        if s.mode == "eval":
            return len(self.source) // s.batch_size
        return len(self.entries) // (s.batch_size * s.shard.world_size)

    @property
    def skipped(self) -> dict[str, str]:
        """Entries skipped mid-run because their files broke: video id -> reason (with
        ``py_workers`` the reason is in the worker's log line, which names the file)."""
        found = dict.fromkeys(self._skipped_ids, "unreadable: see the log for the file and error")
        return {**found, **self.source.skipped}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for outputs in self.iterator:
            self.steps_done += 1
            out = self.unpacked(outputs[0])
            skipped = out["skipped"].reshape(-1)
            for i in skipped[skipped >= 0].tolist():
                self._skipped_ids.add(self.entries[i].video_id)
            yield self._device_stage(out)
        self.iterator.reset()
        self.epoch += 1
        self.steps_done = 0

    def unpacked(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pipeline's outputs with ``meta`` split into the source's named host tensors
        (``SampleSource.unpack``; they stay on the host: no device sync)."""
        out = dict(outputs)
        meta = out.pop("meta").numpy()
        out.update((k, torch.from_numpy(v)) for k, v in self.source.unpack(meta).items())
        return out

    def _device_stage(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The filterbank and the filterbank/image augmentations, on the training device, of a
        batch's ``unpacked`` outputs."""
        dev, cfg, mode = self.device, self.cfg, self.cfg.mode
        # Nothing here waits for the device (no blocking copy, no read of a device value), so
        # this stage's launches overlap the previous training step still running on the GPU.
        wave = to_device(out["wave"], dev)
        wave_len = out["wave_len"].reshape(-1)  # on the host: checked there, no device sync
        feats = audio.features(
            wave, wave_len, cfg.audio_mean, cfg.audio_std, cfg.target_frames, cfg.fbank_backend
        )
        image = feats.unsqueeze(1)  # (B, 1, T, F): the fbank image, time as height
        batch = {
            "visual": to_device(out["visual"], dev),
            "labels": to_device(out["labels"], dev),
            "index": out["index"].reshape(-1),
            "frame_k": out["frame_k"],
        }
        if mode == "pretrain":
            params = out["a_params"].long()  # on the host, as the kernels want them
            image = K.roll(image, params[:, 0], 2, params[:, 0] != 0)
            aug = augment.apply_audio(
                image.expand(-1, 3, -1, -1), out["t_a"], params, cfg.time_shift_applied
            )
            # Contiguous (apply_audio's result already is, in this layout): strides that
            # depended on the batch's draws would make torch.compile recompile.
            batch["audio_aug"] = aug.transpose(2, 3).contiguous()
            batch["visual_aug"] = augment.apply_visual(
                to_device(out["visual_aug"], dev),
                out["t_v"],
                cfg.image_mean,
                cfg.image_std,
            )
            for name in ("t_a", "t_v", "t_a_cen", "t_v_cen"):
                if name in out:
                    batch[name] = to_device(out[name], dev)
        elif mode == "finetune":
            params = out["ft_params"].long()  # on the host, as the kernels want them
            image = K.roll_and_mask(image, params[:, 0], params[:, 1:5], fill=self._mask_fill)
        # The model's layout: (B, 3, F, T), three equal channels (an expanded view, no copy).
        batch["audio"] = image.transpose(2, 3).expand(-1, 3, -1, -1)
        valid = out["valid"].reshape(-1).bool()
        if mode == "eval" and not bool(valid.all()):
            keep = valid.nonzero().reshape(-1)
            batch = {k: v[keep.to(v.device)] for k, v in batch.items()}
        return batch

    def state_dict(self) -> dict:
        """Position to resume from: after the last batch this loader yielded."""
        return self.state_at(self.epoch, self.steps_done)

    def state_at(self, epoch: int, steps_done: int) -> dict:
        """The state after ``steps_done`` batches of ``epoch`` (``state_dict`` is the loader's own
        position; a consumer that runs behind the loader asks for its own)."""
        offset = self._start_offset if epoch == self._start_epoch else 0
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "global_position": offset + steps_done * self.cfg.batch_size * self.shard.world_size,
            "world_size": self.shard.world_size,
        }


def checked_entries(
    json_path: str,
    label_csv: str,
    *,
    seconds: float,
    sample_rate: int,
    frames_per_clip: int,
    weights_csv: str | None = None,
    gpu: bool = False,
    video_decoder: str = "auto",
    progress: bool = True,
    trust_cache: bool = False,
) -> tuple[EntryTable, np.ndarray | None, str]:
    """The usable entries of a dataset file, their weights, and where their videos are decoded
    ("cpu" or "gpu", see :func:`video_decoder_for`), after the cached dataset check.

    Entries with errors are skipped, each logged with its file, then counted; warnings are what
    the pipeline repairs (resample, downmix, pad). Where videos are decoded on the CPU (always
    without a GPU), a video codec that DALI's CPU decoder cannot handle is an error for that
    entry. Under ``torch.distributed`` rank 0 checks first and the others take its cache's
    results without stat-ing the media again (a node whose ranks cannot see that cache checks
    afresh); ``trust_cache`` makes rank 0 take it too.
    """
    from equiav.data.check import check_dataset

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    kwargs = dict(
        label_csv=label_csv,
        weights_csv=weights_csv,
        seconds=seconds,
        sample_rate=sample_rate,
        frames_per_clip=frames_per_clip,
    )
    if dist and rank != 0:
        torch.distributed.barrier()  # wait for rank 0 to fill the cache
    # Rank 0 has just checked every file: the others take its cache as it is (rank 0 too
    # with trust_cache, for a list another loader of this run has checked).
    report = check_dataset(
        json_path, progress=progress and rank == 0, trust_cache=trust_cache or rank != 0, **kwargs
    )
    if dist and rank == 0:
        torch.distributed.barrier()
    codecs = {report.video_codec[i] for i in report.usable} - {None}
    decoder = video_decoder_for(video_decoder, codecs, gpu)
    if decoder == "cpu":
        report = report.promote("cpu_undecodable")
    errors = report.errors()
    if rank == 0:
        for issue in errors:
            log.warning("skipping entry: %s", issue.format())
        if errors:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items()))
            log.warning(
                "%s: %d of %d entries skipped for errors (%s)",
                json_path,
                len(report.entries) - len(report.usable),
                len(report.entries),
                counts,
            )
    entries = report.clean_entries()
    if not entries:
        first = f"; the first: {errors[0].format()}" if errors else ""
        raise ValueError(f"{json_path}: no usable entries ({report.summary()}){first}")
    weights = report.clean_weights() if weights_csv is not None else None
    return entries, weights, decoder


def video_decoder_for(setting: str, codecs: set[str], gpu: bool) -> str:
    """Where a loader decodes video files: "cpu" (DALI's CPU decoder, fed keyframe excerpts;
    on a GPU the frames are then copied to it) or "gpu" (NVDEC).

    ``setting`` is ``data.video_decoder``: "cpu", "gpu" (only with a GPU), or "auto": the CPU
    when every codec in ``codecs`` decodes there (VP8, VP9, MJPEG), else NVDEC. Why the CPU by
    default: on the H100, NVDEC fed 15-21 samples/s of the synthetic VP9 clips (a decoder call
    per 10 s clip and view: its setup, not the decoding, costs; ``bench/GPU-SESSIONS.md``), less
    than the paper-style loader; the CPU decodes only a GOP per view from an excerpt.
    """
    from dali_pipelines.video import CPU_VIDEO_CODECS

    if setting not in ("auto", "cpu", "gpu"):
        raise ValueError(f"data.video_decoder must be auto, cpu or gpu, got {setting!r}")
    if not gpu or setting == "cpu":
        return "cpu"
    if setting == "gpu":
        return "gpu"
    return "cpu" if codecs <= CPU_VIDEO_CODECS else "gpu"


def holdout_indices(n: int, fraction: float, held_out: bool) -> np.ndarray:
    """Indices of the validation part (``held_out``) or the rest of ``n`` entries.

    The split is a fixed seeded draw of ``round(n * fraction)`` entries (at least one), the same
    for every run and rank, so that a user can choose checkpoints without the test list.
    """
    n_val = max(1, round(n * fraction))
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(0x7A1).permutation(n)[:n_val]] = True
    return np.flatnonzero(chosen if held_out else ~chosen)


def build_loader(
    cfg,
    split: str,
    mode: str,
    shard: Shard | None = None,
    device: torch.device | str = "cpu",
    state: dict | None = None,
    balanced: bool = False,
    recheck: bool = True,
):
    """A ``DaliLoader`` over ``cfg.data.{split}_json`` (split "train", "val", "test", "retrieval").

    With ``data.val_fraction`` > 0, "val" is a held-out part of the training list and "train"
    the rest (see ``holdout_indices``). ``recheck=False`` takes the dataset check's cache as it
    is on every rank, for a list this run's other loader has just checked (the training list's
    held-out part: on rank 0 a second stat pass over every file, ~1 minute at AudioSet-2M size).

    ``cfg`` is an ``equiav.config.Config``; ``balanced`` draws training samples with the dataset's
    class-balanced weights (``data.weights_csv``). Returns a ``DaliLoader``, or with
    ``data.thread_prefetch`` > 0 a ``dali_pipelines.threaded.ThreadedLoader`` around it (the same
    batches and state, made ahead in a background thread).
    """
    data = cfg.data
    holdout = data.val_fraction > 0 and split in ("train", "val")
    json_path = data.train_json if holdout else getattr(data, f"{split}_json")
    if json_path is None:
        raise ValueError(f"data.{'train' if holdout else split}_json is not set")
    if data.label_csv is None:
        raise ValueError("data.label_csv is not set")
    if balanced and data.weights_csv is None:
        raise ValueError("class-balanced sampling needs data.weights_csv")
    device = torch.device(device)
    entries, weights, decoder = checked_entries(
        json_path,
        data.label_csv,
        seconds=data.clip_seconds,
        sample_rate=data.sample_rate,
        frames_per_clip=data.frames_per_clip,
        weights_csv=data.weights_csv if balanced else None,
        gpu=device.type == "cuda",
        video_decoder=data.video_decoder,
        trust_cache=not recheck,
    )
    if holdout:
        keep = holdout_indices(len(entries), data.val_fraction, split == "val")
        entries = entries.take(keep)
        weights = weights[keep] if weights is not None else None
    lcfg = LoaderConfig(
        batch_size=cfg.train.batch_size
        if mode != "eval"
        else (cfg.eval.batch_size or cfg.train.batch_size),
        mode=mode,
        seed=cfg.train.seed,
        audio_mean=data.resolved_mean(),
        audio_std=data.resolved_std(),
        target_frames=data.target_length,
        image_size=data.image_size,
        frames_per_clip=data.frames_per_clip,
        eval_frame=data.eval_frame,
        num_threads=data.num_threads,
        prefetch=data.prefetch,
        py_workers=data.py_workers,
        weights=weights,
        augment=cfg.augment,
        cen_num=cfg.model.cen_num if cfg.model.cen_mean else 0,
        time_shift_applied=cfg.quirks.time_shift_applied,
        ft_specaug=cfg.quirks.ft_specaug,
        image_mean=data.image_mean,
        image_std=data.image_std,
        keep_freed_memory=data.keep_freed_memory,
        video_decoder=decoder,
        hw_decoder_load=data.hw_decoder_load,
        fbank_backend=data.fbank_backend,
    )
    loader = DaliLoader(entries, read_label_csv(data.label_csv), lcfg, shard, device, state)
    if data.thread_prefetch > 0:
        from dali_pipelines.threaded import ThreadedLoader

        return ThreadedLoader(loader, data.thread_prefetch)
    return loader
