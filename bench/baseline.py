"""The paper-style baseline loader: EquiAV's data steps as its original code runs them, on the CPU.

The loader benchmark compares our DALI pipeline with this: a ``torch.utils.data.Dataset`` whose
``__getitem__`` does exactly the original (CAV-MAE-derived) dataset class's sample path, and a
plain ``DataLoader`` with one worker per core, one torch thread each. The steps follow
``shared/spec/EQUIAV.md`` ("Data", "Audio features", "Visual features", "Pretraining
augmentations", finetuning mixup) and use the libraries the original uses:

- audio: ``soundfile`` read (resampled to 16 kHz with torchaudio only when the file is not at
  16 kHz, which the original never does), mean removal, ``torchaudio.compliance.kaldi.fbank``, zero
  pad/cut to ``target_length`` frames, ``(x - mean) / std``;
- visual: ``PIL.Image.open(frame_{k}/{id}.jpg)`` for the frames layout, or a PyAV seek to the
  keyframe before k + 0.5 s and a decode forward to the frame on screen at that time for a video
  file; clean view by torchvision ``Resize(224, bicubic)``, ``CenterCrop``, ``ToTensor``,
  ``Normalize``;
- pretraining: the augmented views with torchvision's functional transforms, their parameter
  vectors t_a (24) and t_v (18) in the spec's index layout, ``cen_num`` further vectors per
  modality (drawn, not applied) and the time roll of the clean fbank;
- finetuning: mixup (p 0.5, partner uniform, lambda ~ Beta(10, 10); waveforms mixed before the
  fbank, frames after normalisation, labels mixed), SpecAugment masks, the time roll;
- the fbank images leave the dataset as the original's do, (3, T, F), and the training step
  transposes them on the device (``batch_to_device``), as the original's model does;
- ``unused_work`` (default on): the work the original's sample path does whose results training
  never reads. Each ``cen_num`` crop is drawn on a fresh random image, ``torch.rand(3, 1024,
  128)`` for audio and ``torch.rand(3, 224, 224)`` for visual (torchvision's ``get_params`` only
  reads its shape; ~47 ms a pretraining sample on one core, as much again as the rest of the
  sample); in finetuning its ``__getitem__`` still makes the (disabled) augmented outputs, a
  third frame decoded and normalised at its own size and the fbank repeated, which its workers
  collate and its trainer drops. Off: a lean paper-style loader, the original's sample path
  without that waste. Every benchmark result from before the option existed measured a lean
  loader that also transposed the fbank images on the CPU and had a DataLoader with pinned
  memory and workers kept across epochs (async copies to the GPU).

A DataLoader as the original's scripts build one (``make_loader``): no pinned memory, workers
that end with each epoch.

Where the spec corrects a quirk of the original (the audio time shift is rolled along time, not
along the channel axis; finetuning applies its SpecAugment masks) this follows the correction: the
cost is the same either way. Randomness comes from the global ``random`` and torch generators,
which a DataLoader user seeds per worker (``make_loader`` does, from the dataset's seed and the
worker id).

Command line (prints one JSON object)::

    python -m bench.baseline runs/synth/train.json \\
        --label-csv runs/synth/class_labels_indices.csv --per-sample 30 --workers 2 --batches 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import soundfile
import torch
import torchaudio
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, default_collate

from bench.common import BASELINE_WORK, cpu_fields, process_tree_cpu_seconds, whole_rounds
from equiav.data.index import DatasetError, read_dataset, read_label_csv

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_OFFSET_S = 0.5  # frame k of a clip is the one on screen at k + 0.5 s
MODES = ("pretrain", "finetune", "eval")

T_A = 24
T_V = 18
TIME_MASK = 192  # SpecAugment maximum widths (frames, mel bins)
FREQ_MASK = 48
AUDIO_CROP_SCALE = (0.08, 1.0)
AUDIO_CROP_RATIO = (1 / 10, 1.5 / 8)  # w / h on the (time = height) x (frequency = width) image
VISUAL_CROP_SCALE = (0.08, 1.0)
VISUAL_CROP_RATIO = (3 / 4, 4 / 3)
JITTER_FACTOR = (0.6, 1.4)  # brightness, contrast and saturation factors
JITTER_HUE = (-0.1, 0.1)
BLUR_SIGMA = (0.1, 2.0)
MIXUP_ALPHA = 10.0
# Decoded frame times are inexact in container time bases (1/1000 s for WebM): a frame stamped at
# exactly k + 0.5 s must count as "at or before" it.
_TIME_EPS_S = 1e-6


@dataclass(frozen=True)
class AugmentProbs:
    """Probabilities of the optional pretraining transformations (the spec's defaults)."""

    specaug: float = 0.8  # masks + time shift, one coin
    audio_jitter: float = 0.8
    audio_blur: float = 0.5
    audio_flip: float = 0.5
    visual_jitter: float = 0.8
    visual_blur: float = 0.5
    visual_flip: float = 0.5
    visual_gray: float = 0.2

    @classmethod
    def constant(cls, p: float) -> AugmentProbs:
        """Every transformation with probability ``p`` (0: none, 1: all)."""
        return cls(p, p, p, p, p, p, p, p)


@dataclass(frozen=True)
class Jitter:
    """A colour jitter as ``ColorJitter.get_params`` draws it: order of the four, then factors."""

    order: tuple[int, ...]  # permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class AudioAug:
    """One draw of the audio augmentation (on the (3, T, F) image, time as height)."""

    specaug: bool
    time_mask: tuple[int, int]  # rows [start, end) set to 0
    freq_mask: tuple[int, int]  # columns [start, end) set to 0
    shift: int  # roll along time, in frames
    crop: tuple[int, int, int, int]  # (i, j, h, w): top, left, height, width
    jitter: Jitter | None
    sigma: float | None  # Gaussian blur standard deviation; None: no blur
    flip: bool


@dataclass(frozen=True)
class VisualAug:
    """One draw of the visual augmentation (on the decoded frame at its own size)."""

    crop: tuple[int, int, int, int]
    jitter: Jitter | None
    sigma: float | None
    flip: bool
    gray: bool


# ----------------------------------------------------------------------------------------------
# Parameter draws and t-vectors


def _coin(p: float) -> bool:
    return random.random() < p


Canvas = Callable[[int, int], torch.Tensor]


def _canvas(height: int, width: int) -> torch.Tensor:
    """A stand-in image of the given size for ``get_params`` (which only reads the shape)."""
    return torch.zeros(1, 1).expand(height, width)


def random_canvas(height: int, width: int) -> torch.Tensor:
    """The image the original draws a ``cen_num`` vector's crop on: a fresh ``torch.rand(3, H,
    W)`` (only its shape is read; its cost is the point: the original pays it per draw)."""
    return torch.rand(3, height, width)


def draw_jitter(p: float) -> Jitter | None:
    """Colour jitter with probability ``p``, drawn by torchvision's ``ColorJitter.get_params``."""
    if not _coin(p):
        return None
    order, b, c, s, h = T.ColorJitter.get_params(
        list(JITTER_FACTOR), list(JITTER_FACTOR), list(JITTER_FACTOR), list(JITTER_HUE)
    )
    return Jitter(tuple(order.tolist()), float(b), float(c), float(s), float(h))


def draw_audio_aug(
    probs: AugmentProbs, frames: int, bins: int = NUM_MEL_BINS, canvas: Canvas = _canvas
) -> AudioAug:
    """Draw one audio augmentation for a ``frames`` x ``bins`` fbank image (spec order); the
    crop is drawn on ``canvas(frames, bins)``."""
    specaug = _coin(probs.specaug)
    time_mask = freq_mask = (0, 0)
    shift = 0
    if specaug:
        width = random.random() * TIME_MASK
        start = math.floor(random.random() * (frames - width))
        time_mask = (start, start + math.floor(width))
        width = random.random() * FREQ_MASK
        start = math.floor(random.random() * (bins - width))
        freq_mask = (start, start + math.floor(width))
        shift = random.randrange(-frames, frames)
    crop = T.RandomResizedCrop.get_params(
        canvas(frames, bins), list(AUDIO_CROP_SCALE), list(AUDIO_CROP_RATIO)
    )
    jitter = draw_jitter(probs.audio_jitter)
    sigma = random.uniform(*BLUR_SIGMA) if _coin(probs.audio_blur) else None
    flip = _coin(probs.audio_flip)
    return AudioAug(specaug, time_mask, freq_mask, shift, crop, jitter, sigma, flip)


def draw_visual_aug(
    probs: AugmentProbs, height: int, width: int, canvas: Canvas = _canvas
) -> VisualAug:
    """Draw one visual augmentation for a ``height`` x ``width`` frame (spec order); the crop is
    drawn on ``canvas(height, width)``."""
    crop = T.RandomResizedCrop.get_params(
        canvas(height, width), list(VISUAL_CROP_SCALE), list(VISUAL_CROP_RATIO)
    )
    jitter = draw_jitter(probs.visual_jitter)
    sigma = random.uniform(*BLUR_SIGMA) if _coin(probs.visual_blur) else None
    flip = _coin(probs.visual_flip)
    gray = _coin(probs.visual_gray)
    return VisualAug(crop, jitter, sigma, flip, gray)


def _jitter_values(jitter: Jitter | None) -> list[float]:
    """[on, order x4, b - 1, c - 1, s - 1, h]; off: zeros with the order 0, 1, 2, 3."""
    if jitter is None:
        return [0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    j = jitter
    return [1.0, *map(float, j.order), j.brightness - 1, j.contrast - 1, j.saturation - 1, j.hue]


def audio_values(aug: AudioAug, frames: int, bins: int = NUM_MEL_BINS) -> list[float]:
    """t_a's 24 values in the spec's layout (see ``audio_vector``).

    The crop keeps the original's quirk: time quantities are divided by the number of mel bins
    and frequency quantities by the number of frames ([8] = i / 128, [9] = j / 1024, ...).
    """
    if aug.specaug:
        shift = aug.shift / frames
        spec = [1.0, *aug.time_mask, *aug.freq_mask, 1.0, shift]
    else:
        spec = [0.0] * 7
    i, j, h, w = aug.crop
    crop = [1.0, i / bins, j / frames, h / bins, w / frames]
    blur = [1.0, aug.sigma] if aug.sigma is not None else [0.0, 0.0]
    return spec + crop + _jitter_values(aug.jitter) + blur + [float(aug.flip)]


def audio_vector(aug: AudioAug, frames: int, bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """t_a (24,) float32: [0] SpecAugment on, [1..4] mask bounds, [5] shift on, [6] shift / T,
    [7] crop, [8..11] crop (quirk-scaled), [12] jitter on, [13..16] order, [17..20] factors,
    [21] blur on, [22] sigma, [23] flip."""
    return torch.tensor(audio_values(aug, frames, bins), dtype=torch.float32)


def visual_values(aug: VisualAug, height: int, width: int) -> list[float]:
    """t_v's 18 values in the spec's layout (see ``visual_vector``)."""
    i, j, h, w = aug.crop
    crop = [1.0, i / height, j / width, h / height, w / width]
    blur = [1.0, aug.sigma] if aug.sigma is not None else [0.0, 0.0]
    return crop + _jitter_values(aug.jitter) + blur + [float(aug.flip), float(aug.gray)]


def visual_vector(aug: VisualAug, height: int, width: int) -> torch.Tensor:
    """t_v (18,) float32: [0] crop, [1..4] i/H, j/W, h/H, w/W of the frame it was drawn on,
    [5] jitter on, [6..9] order, [10..13] factors, [14] blur on, [15] sigma, [16] flip,
    [17] grayscale."""
    return torch.tensor(visual_values(aug, height, width), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Applying the draws (torchvision functional transforms, as the original calls them)


def apply_jitter(img: torch.Tensor | Image.Image, jitter: Jitter) -> torch.Tensor | Image.Image:
    """torchvision's ``adjust_*`` in the drawn order (float tensors are clamped to [0, 1])."""
    for fn_id in jitter.order:
        if fn_id == 0:
            img = F.adjust_brightness(img, jitter.brightness)
        elif fn_id == 1:
            img = F.adjust_contrast(img, jitter.contrast)
        elif fn_id == 2:
            img = F.adjust_saturation(img, jitter.saturation)
        else:
            img = F.adjust_hue(img, jitter.hue)
    return img


def blur_kernel_size(sigma: float) -> int:
    """The audio blur's kernel: 2 * ceil(sigma) + 1 in both axes."""
    return 2 * math.ceil(sigma) + 1


def apply_audio_aug(image: torch.Tensor, aug: AudioAug) -> torch.Tensor:
    """The augmented audio view of a (3, T, F) fbank image (time as height, frequency as width)."""
    frames, bins = image.shape[-2:]
    out = image.clone()
    if aug.specaug:
        out[:, aug.time_mask[0] : aug.time_mask[1], :] = 0
        out[:, :, aug.freq_mask[0] : aug.freq_mask[1]] = 0
        out = torch.roll(out, aug.shift, dims=1)
    out = F.resized_crop(out, *aug.crop, [frames, bins], antialias=True)
    if aug.jitter is not None:
        out = apply_jitter(out, aug.jitter)
    if aug.sigma is not None:
        k = blur_kernel_size(aug.sigma)
        out = F.gaussian_blur(out, [k, k], [aug.sigma, aug.sigma])
    if aug.flip:
        out = F.hflip(out)  # reverses the last axis: frequency
    return out


def apply_visual_aug(frame: Image.Image, aug: VisualAug, image_size: int = 224) -> Image.Image:
    """The augmented visual view of a PIL frame, before ``ToTensor`` and ``Normalize``."""
    img = F.resized_crop(frame, *aug.crop, [image_size, image_size], T.InterpolationMode.BILINEAR)
    if aug.jitter is not None:
        img = apply_jitter(img, aug.jitter)
    if aug.sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=aug.sigma))  # the original's PIL blur
    if aug.flip:
        img = F.hflip(img)
    if aug.gray:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    return img


# ----------------------------------------------------------------------------------------------
# Media


def read_waveform(path: str) -> torch.Tensor:
    """Mono float32 waveform in [-1, 1] at 16 kHz (channels averaged; resampled if needed)."""
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"{path}: cannot read as audio ({err})") from err
    if data.shape[0] == 0:
        raise ValueError(f"{path}: audio file has no samples")
    wave = torch.from_numpy(
        np.ascontiguousarray(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    )
    if rate != SAMPLE_RATE:
        # The original assumes 16 kHz and never resamples; a benchmark on other rates would be
        # comparing different features, so bring them to 16 kHz first.
        wave = torchaudio.functional.resample(wave, rate, SAMPLE_RATE)
    return wave


def kaldi_fbank(wave: torch.Tensor) -> torch.Tensor:
    """(frames, 128) log-mel filterbank of a 1-D 16 kHz waveform, with the spec's arguments."""
    return torchaudio.compliance.kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=NUM_MEL_BINS,
        dither=0.0,
        frame_shift=10,
    )


def pad_or_cut(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad (after the log) or cut a (frames, bins) fbank to ``target_length`` frames."""
    missing = target_length - fbank.shape[0]
    if missing > 0:
        return torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    return fbank[:target_length]


def seek_decode_frame(path: str, second: float) -> Image.Image:
    """The frame on screen at ``second`` of a video file, as a PIL RGB image.

    Seeks to the keyframe at or before ``second`` and decodes forward to the last frame whose
    time, relative to the stream's start, is <= ``second`` (clamped to the first and last
    frames). One decoding thread, as one torch thread per worker.
    """
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: cannot open as a video ({err})") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        start = stream.start_time or 0
        target = start + math.floor((max(second, 0.0) + _TIME_EPS_S) / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        first = chosen = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            if first is None:
                first = frame
            if frame.pts > target:
                break
            chosen = frame
        if chosen is None:  # a target before the first frame gets the first frame
            chosen = first
        if chosen is None:
            raise ValueError(f"{path}: no frame decoded at {second:.3f} s")
        return chosen.to_image()


# ----------------------------------------------------------------------------------------------
# The dataset


class PaperStyleDataset(Dataset):
    """EquiAV's dataset class, re-implemented: one sample per ``__getitem__``, as the paper loads.

    Returns a dict of float32 tensors: ``audio`` (3, T, 128) and ``visual`` (3, S, S) (clean
    views; the fbank image time-major, as the original's dataset returns it: the model's (3, 128,
    T) is a transpose on the device, ``batch_to_device``), ``labels`` (n_class,), and in pretrain
    mode ``audio_aug`` (3, T, 128), ``visual_aug``, ``t_a`` (24,), ``t_v`` (18,), ``t_a_cen``
    (cen_num, 24) and ``t_v_cen`` (cen_num, 18). With ``unused_work`` in finetune mode also
    ``unused_audio`` (3, T, 128) and ``unused_visual`` (3, H, W of the frame): the original's
    disabled augmented outputs, which nothing reads (see the module docstring). ``noise`` (the
    clean-fbank time roll) defaults to on for pretrain and finetune and is never applied in eval
    mode.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        label_csv: str | os.PathLike,
        mode: str = "pretrain",
        audio_mean: float = -4.346,
        audio_std: float = 4.332,
        target_length: int = 1024,
        frames_per_clip: int = 10,
        eval_frame: int = 5,
        image_size: int = 224,
        cen_num: int = 16,
        seed: int = 0,
        *,
        probs: AugmentProbs | None = None,
        mixup: float = 0.5,
        noise: bool | None = None,
        finetune_specaug: bool = True,
        unused_work: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not audio_std > 0:
            raise ValueError(f"audio_std must be > 0, got {audio_std}")
        if target_length < 1 or image_size < 1 or cen_num < 0 or not 0 <= mixup <= 1:
            raise ValueError(
                "need target_length >= 1, image_size >= 1, cen_num >= 0, mixup in [0, 1]"
            )
        if not 0 <= eval_frame < frames_per_clip:
            raise ValueError(
                f"eval_frame {eval_frame} must be in [0, frames_per_clip={frames_per_clip})"
            )
        self.json_path = os.fspath(json_path)
        self.entries = read_dataset(json_path)
        if not self.entries:
            raise DatasetError(f"{self.json_path}: the dataset has no entries")
        label_set = read_label_csv(label_csv)
        self.labels = []
        for e in self.entries:
            unknown = [m for m in e.labels if m not in label_set.index]
            if unknown:
                raise DatasetError(
                    f"{self.json_path}: {e.video_id}: labels {unknown} are not in {label_csv}"
                )
            self.labels.append(torch.from_numpy(label_set.multi_hot(e.labels)))
        self.mode = mode
        self.audio_mean, self.audio_std = float(audio_mean), float(audio_std)
        self.target_length = target_length
        self.frames_per_clip, self.eval_frame = frames_per_clip, eval_frame
        self.image_size, self.cen_num, self.seed = image_size, cen_num, seed
        self.probs = probs if probs is not None else AugmentProbs()
        self.mixup = mixup if mode == "finetune" else 0.0
        self.noise = (mode != "eval") if noise is None else (noise and mode != "eval")
        self.finetune_specaug = finetune_specaug and mode == "finetune"
        self.unused_work = unused_work
        self.clean_transform = T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.freq_masking = torchaudio.transforms.FrequencyMasking(FREQ_MASK)
        self.time_masking = torchaudio.transforms.TimeMasking(TIME_MASK)

    def __len__(self) -> int:
        return len(self.entries)

    def seed_worker(self, worker_id: int, epoch_seed: int = 0) -> None:
        """Seed this process's ``random`` and torch generators from (seed, worker id,
        ``epoch_seed``: the DataLoader's seed for this epoch's workers, >= 0)."""
        key = [self.seed, worker_id, epoch_seed]
        py_seed, torch_seed = np.random.SeedSequence(key).generate_state(2)
        random.seed(int(py_seed))
        torch.manual_seed(int(torch_seed))

    # -- pieces --------------------------------------------------------------------------------

    def _features(self, wave: torch.Tensor) -> torch.Tensor:
        """Normalised (T, 128) fbank of a mean-removed waveform (finetune masks before the norm,
        as CAV-MAE applies them), rolled along time when ``noise`` is on."""
        fbank = pad_or_cut(kaldi_fbank(wave), self.target_length)
        if self.finetune_specaug:
            masked = self.time_masking(self.freq_masking(fbank.t().unsqueeze(0)))
            fbank = masked.squeeze(0).t()
        fbank = (fbank - self.audio_mean) / self.audio_std
        if self.noise:
            fbank = torch.roll(fbank, random.randrange(-self.target_length, self.target_length), 0)
        return fbank

    def _train_k(self) -> int:
        return random.randint(0, self.frames_per_clip - 1)

    def _frame(self, index: int, k: int) -> Image.Image:
        """Frame k of clip ``index`` as a PIL RGB image (frames layout or video file)."""
        entry = self.entries[index]
        if entry.is_video_file:
            return seek_decode_frame(entry.video_path, k + FRAME_OFFSET_S)
        # The original steps back to an earlier frame while frame k is missing (short clips).
        while k > 0 and not os.path.exists(entry.frame_path(k)):
            k -= 1
        with Image.open(entry.frame_path(k)) as img:
            return img.convert("RGB")

    # -- samples -------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.mixup > 0 and _coin(self.mixup):
            return self._mixed_sample(index)
        entry = self.entries[index]
        wave = read_waveform(entry.wav)
        fbank = self._features(wave - wave.mean())
        k = self.eval_frame if self.mode == "eval" else self._train_k()
        image = fbank.unsqueeze(0).repeat(3, 1, 1)  # (3, T, F): the channel repeated
        sample = {
            "audio": image,
            "visual": self.clean_transform(self._frame(index, k)),
            "labels": self.labels[index].clone(),
        }
        if self.mode == "pretrain":
            sample.update(self._augmented(index, image))
        elif self.mode == "finetune":
            sample.update(self._unused_outputs(index, fbank))
        return sample

    def _unused_outputs(self, index: int, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
        """Finetuning with ``unused_work``: the augmented outputs the original's ``__getitem__``
        makes with its augmentations disabled (the fbank repeated to three channels; a frame
        drawn anew, decoded, to a tensor and normalised at its own size) and returns for its
        workers to collate; its trainer never reads them."""
        if not self.unused_work:
            return {}
        frame = self._frame(index, self._train_k())
        return {
            "unused_audio": fbank.unsqueeze(0).repeat(3, 1, 1),
            "unused_visual": self.normalize(F.to_tensor(frame)),
        }

    def _augmented(self, index: int, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pretraining views, their t-vectors and the ``cen_num`` sampled vectors."""
        frames, bins = image.shape[-2:]
        a_aug = draw_audio_aug(self.probs, frames, bins)
        audio_aug = apply_audio_aug(image, a_aug)
        frame = self._frame(index, self._train_k())  # the second frame draw
        width, height = frame.size
        v_aug = draw_visual_aug(self.probs, height, width)
        visual_aug = self.normalize(F.to_tensor(apply_visual_aug(frame, v_aug, self.image_size)))
        size = self.image_size  # the original draws the sampled visual crops on the output size
        canvas = random_canvas if self.unused_work else _canvas
        t_a_cen = [
            audio_values(draw_audio_aug(self.probs, frames, bins, canvas), frames, bins)
            for _ in range(self.cen_num)
        ]
        t_v_cen = [
            visual_values(draw_visual_aug(self.probs, size, size, canvas), size, size)
            for _ in range(self.cen_num)
        ]
        return {
            "audio_aug": audio_aug,
            "visual_aug": visual_aug,
            "t_a": audio_vector(a_aug, frames, bins),
            "t_v": visual_vector(v_aug, height, width),
            "t_a_cen": torch.tensor(t_a_cen, dtype=torch.float32).reshape(-1, T_A),
            "t_v_cen": torch.tensor(t_v_cen, dtype=torch.float32).reshape(-1, T_V),
        }

    def _mixed_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Finetuning mixup with a uniformly drawn partner (CAV-MAE's order of steps)."""
        partner = random.randint(0, len(self) - 1)
        wave1 = read_waveform(self.entries[index].wav)
        wave2 = read_waveform(self.entries[partner].wav)
        wave1, wave2 = wave1 - wave1.mean(), wave2 - wave2.mean()
        if len(wave2) < len(wave1):  # the partner is padded or cut to the first's length
            wave2 = torch.nn.functional.pad(wave2, (0, len(wave1) - len(wave2)))
        wave2 = wave2[: len(wave1)]
        lam = random.betavariate(MIXUP_ALPHA, MIXUP_ALPHA)
        mixed = lam * wave1 + (1 - lam) * wave2
        fbank = self._features(mixed - mixed.mean())
        visual1 = self.clean_transform(self._frame(index, self._train_k()))
        visual2 = self.clean_transform(self._frame(partner, self._train_k()))
        return {
            "audio": fbank.unsqueeze(0).repeat(3, 1, 1),
            "visual": lam * visual1 + (1 - lam) * visual2,
            "labels": lam * self.labels[index] + (1 - lam) * self.labels[partner],
            **self._unused_outputs(index, fbank),
        }


# ----------------------------------------------------------------------------------------------
# Loader and measurements


def _init_worker(worker_id: int) -> None:
    """One torch thread per worker; the worker's generators seeded from (seed, worker id, the
    loader's seed for this epoch's workers: new workers each epoch must not replay the last
    epoch's draws; it comes from the loader's seeded generator, so runs repeat)."""
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    seed_worker = getattr(info.dataset, "seed_worker", None) if info is not None else None
    if seed_worker is not None:
        seed_worker(worker_id, info.seed)


def make_loader(
    dataset: Dataset, batch_size: int, workers: int, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """A plain DataLoader as the paper's training scripts build one, ``workers`` processes: no
    pinned memory, workers that end with each epoch (torch's defaults, as the original leaves
    them; its batches reach the GPU by a blocking copy, ``batch_to_device``).

    ``seed`` fixes the shuffling order; each worker seeds its own generators (see
    ``PaperStyleDataset.seed_worker``). Training loaders (``shuffle``) drop the last partial batch,
    as the original's do.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        worker_init_fn=_init_worker if workers > 0 else None,
        collate_fn=collate,
        drop_last=shuffle,
        generator=generator,
    )


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """torch's default collation, key by key, except that the finetuning's unused frames
    (``unused_visual``, at each frame's own size) stay a list when their sizes differ: the
    original's collation would fail there; the work is done either way."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        ragged = key.startswith("unused_") and len({tuple(v.shape) for v in values}) > 1
        out[key] = values if ragged else default_collate(values)
    return out


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated batch as the original's training step takes it: the tensors it reads copied to
    ``device`` (from pageable memory, as its ``.cuda()`` calls do: the unused outputs stay
    behind), the fbank images transposed there to the model's (B, 3, 128, T), as its model's
    forward does."""
    out = {}
    for key, value in batch.items():
        if key.startswith("unused_") or not isinstance(value, torch.Tensor):
            continue
        value = value.to(device)
        out[key] = value.transpose(2, 3) if key in ("audio", "audio_aug") else value
    return out


def measure(loader: DataLoader, batches: int, warmup: int = 2) -> dict[str, float]:
    """Throughput of ``loader`` over ``batches`` batches (rounded up to whole rounds of its
    workers, ``whole_rounds``) after ``warmup`` ones (epochs restart).

    ``ms_per_sample_per_core`` charges every worker (or the main process when there are none) as
    one core; ``cpu_*`` (``bench.common.cpu_fields``) is the CPU the process and its workers
    really used.
    """
    batches = whole_rounds(batches, loader.num_workers)
    iterator = iter(loader)

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    for _ in range(warmup):
        next_batch()
    samples = 0
    cpu_start = process_tree_cpu_seconds()
    start = time.perf_counter()
    for _ in range(batches):
        samples += len(next_batch()["labels"])
    seconds = time.perf_counter() - start
    cores = max(loader.num_workers, 1)
    return {
        **cpu_fields(cpu_start, seconds, samples),
        "samples_per_s": samples / seconds,
        "ms_per_sample_per_core": 1000.0 * seconds * cores / samples,
        "samples": samples,
        "batches": batches,
        "seconds": seconds,
        "workers": loader.num_workers,
        "batch_size": loader.batch_size,
    }


def per_sample_cost(dataset: Dataset, n: int, warmup: int = 2, clock: str = "cpu") -> float:
    """Mean milliseconds of ``dataset[i]`` in this process on one torch thread (the per-core cost).

    Indices cycle from 0; ``warmup`` calls first (library initialisation, file cache).
    ``clock="cpu"`` counts this process's CPU time (all its threads), which is the cost on one
    core even when other processes share the machine; ``"wall"`` counts elapsed time, the same
    on an idle core.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    if clock not in clocks:
        raise ValueError(f"clock must be one of {sorted(clocks)}, got {clock!r}")
    now = clocks[clock]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(warmup):
            dataset[i % len(dataset)]
        start = now()
        for i in range(n):
            dataset[i % len(dataset)]
        return 1000.0 * (now() - start) / n
    finally:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: per-sample cost and/or DataLoader throughput, printed as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    p.add_argument("json", help="dataset JSON")
    p.add_argument("--label-csv", required=True)
    p.add_argument("--mode", default="pretrain", choices=MODES)
    p.add_argument("--audio-mean", type=float, default=-4.346)
    p.add_argument("--audio-std", type=float, default=4.332)
    p.add_argument("--frames-per-clip", type=int, default=10)
    p.add_argument("--cen-num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-sample", type=int, default=20, help="samples timed in-process (0: skip)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: skip)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--baseline-work",
        default="paper",
        choices=BASELINE_WORK,
        help="paper: with the original's unused work (unused_work); lean: without it",
    )
    a = p.parse_args(argv)
    dataset = PaperStyleDataset(
        a.json, a.label_csv, a.mode, a.audio_mean, a.audio_std,
        frames_per_clip=a.frames_per_clip, cen_num=a.cen_num, seed=a.seed,
        unused_work=a.baseline_work == "paper",
    )  # fmt: skip
    result: dict[str, object] = {"mode": a.mode, "dataset": a.json, "work": a.baseline_work}
    if a.per_sample > 0:
        for clock in ("cpu", "wall"):
            dataset.seed_worker(0)
            result[f"per_sample_ms_{clock}"] = per_sample_cost(dataset, a.per_sample, clock=clock)
    if a.workers > 0:
        loader = make_loader(dataset, a.batch_size, a.workers, seed=a.seed)
        result["loader"] = measure(loader, a.batches, a.warmup)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
