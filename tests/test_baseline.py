"""The paper-style baseline loader (bench/baseline.py) on real synthetic media.

Media: the session's ``synth_small`` dataset (4 s clips, JPEG frames layout and VP9 webm) and one
8 s VP9 clip for the seek test. References are computed here with the libraries directly: the wav
read by Python's ``wave`` module, torchaudio's Kaldi fbank, torchvision/PIL transforms re-applied
from what the t-vectors record (so a vector that misdescribes its view fails), and PyAV decoding
every frame from the start of the file.
"""

from __future__ import annotations

import itertools
import math
import wave

import av
import numpy as np
import pytest
import soundfile
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from bench.baseline import (
    AugmentProbs,
    PaperStyleDataset,
    make_loader,
    measure,
    per_sample_cost,
    seek_decode_frame,
)
from equiav.data import synth
from equiav.data.index import DatasetError, read_dataset, read_label_csv, write_dataset
from tests.signals import kaldi_fbank

MEAN, STD = -4.346, 4.332
FRAMES_PER_CLIP = 4  # synth_small's clips are 4 s: frame_0 .. frame_3
EVAL_FRAME = 2
NORMALIZE = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLEAN = T.Compose(
    [
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        NORMALIZE,
    ]
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run on one torch thread, as the baseline's workers do (and immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(info, mode: str, fmt: str = "frames", **kw) -> PaperStyleDataset:
    kw.setdefault("frames_per_clip", FRAMES_PER_CLIP)
    kw.setdefault("eval_frame", min(EVAL_FRAME, kw["frames_per_clip"] - 1))
    kw.setdefault("cen_num", 3)
    return PaperStyleDataset(info.dataset("train", fmt), info.label_csv, mode, MEAN, STD, **kw)


def reference_fbank(path: str, target_length: int) -> tuple[torch.Tensor, int]:
    """Normalised (target_length, 128) fbank of a wav read by the stdlib; and its frame count."""
    with wave.open(path) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    x = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    return fbank_of(x - x.mean(), target_length)


def fbank_of(x: torch.Tensor, target_length: int) -> tuple[torch.Tensor, int]:
    fb = kaldi_fbank(x)
    out = torch.zeros(target_length, 128)
    n = min(fb.shape[0], target_length)
    out[:n] = fb[:n]
    return (out - MEAN) / STD, fb.shape[0]


def frame0(entry) -> Image.Image:
    with Image.open(entry.frame_path(0)) as img:
        return img.convert("RGB")


def jitter(img, order, factors):
    """torchvision's adjust_* in the recorded order; factors (b - 1, c - 1, s - 1, h)."""
    b, c, s, h = (float(v) for v in factors)
    for fn_id in [int(v) for v in order]:
        if fn_id == 0:
            img = F.adjust_brightness(img, b + 1)
        elif fn_id == 1:
            img = F.adjust_contrast(img, c + 1)
        elif fn_id == 2:
            img = F.adjust_saturation(img, s + 1)
        else:
            img = F.adjust_hue(img, h)
    return img


def audio_crop(t_a: torch.Tensor) -> tuple[int, int, int, int]:
    """(i, j, h, w) on the 1024 x 128 image, undoing the quirk scaling (time / 128, freq / 1024)."""
    return tuple(
        int(round(float(v) * s)) for v, s in zip(t_a[8:12], (128, 1024, 128, 1024), strict=True)
    )


def visual_crop(t_v: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    return tuple(
        int(round(float(v) * s))
        for v, s in zip(t_v[1:5], (height, width, height, width), strict=True)
    )


# ----------------------------------------------------------------------------------------------
# Shapes, clean views


@pytest.mark.parametrize("mode", ["pretrain", "finetune", "eval"])
def test_shapes_and_dtypes(synth_small, mode):
    ds = make(synth_small, mode)
    ds.seed_worker(0)
    sample = ds[1]
    # The fbank images time-major, as the original's dataset returns them (the step transposes).
    expected = {"audio": (3, 1024, 128), "visual": (3, 224, 224), "labels": (4,)}
    if mode == "pretrain":
        expected |= {
            "audio_aug": (3, 1024, 128), "visual_aug": (3, 224, 224), "t_a": (24,), "t_v": (18,),
            "t_a_cen": (3, 24), "t_v_cen": (3, 18),
        }  # fmt: skip
    if mode == "finetune":  # the original's disabled augmented outputs (unused_work)
        width, height = frame0(ds.entries[1]).size
        expected |= {"unused_audio": (3, 1024, 128), "unused_visual": (3, height, width)}
    assert {k: tuple(v.shape) for k, v in sample.items()} == expected
    for key, value in sample.items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value).all(), key
    assert torch.equal(sample["audio"][0], sample["audio"][1])
    assert torch.equal(sample["audio"][0], sample["audio"][2])
    if mode != "finetune":  # finetune labels may be mixed
        labels = read_label_csv(synth_small.label_csv)
        want = labels.multi_hot(read_dataset(synth_small.dataset("train"))[1].labels)
        assert torch.equal(sample["labels"], torch.from_numpy(want))


@pytest.mark.parametrize("target_length", [1024, 256])
def test_eval_audio_is_torchaudio_fbank(synth_small, target_length):
    ds = make(synth_small, "eval", target_length=target_length)
    for index in range(2):
        ref, frames = reference_fbank(ds.entries[index].wav, target_length)
        assert frames == 398  # 4 s: 1 + (64000 - 400) // 160; 1024 pads, 256 cuts
        audio = ds[index]["audio"]
        assert audio.shape == (3, target_length, 128)
        for c in range(3):
            torch.testing.assert_close(audio[c], ref, atol=1e-5, rtol=0)
    if target_length == 1024:  # padding is zeros after the log, normalised
        torch.testing.assert_close(audio[:, 398:, :], torch.full((3, 626, 128), -MEAN / STD))


@pytest.mark.parametrize("fmt", ["frames", "webm"])
def test_eval_visual_is_torchvision_clean_view(synth_small, fmt):
    ds = make(synth_small, "eval", fmt=fmt)
    frames_ds = make(synth_small, "eval")
    for index in range(2):
        if fmt == "frames":
            with Image.open(frames_ds.entries[index].frame_path(EVAL_FRAME)) as img:
                frame = img.convert("RGB")
        else:  # the frame on screen at 2.5 s, decoded from the start of the file
            with av.open(ds.entries[index].video_path) as container:
                frames = [f.to_image() for f in container.decode(video=0)]
            frame = frames[synth.frame_index(EVAL_FRAME)]
        torch.testing.assert_close(ds[index]["visual"], CLEAN(frame), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# t-vectors: layout and truthfulness


def test_vectors_neutral_when_off_and_crop_is_truthful(synth_small):
    ds = make(synth_small, "pretrain", probs=AugmentProbs.constant(0.0), frames_per_clip=1)
    ds.seed_worker(0)
    for index in range(3):
        s = ds[index]
        t_a, t_v = s["t_a"], s["t_v"]
        assert torch.equal(t_a[0:7], torch.zeros(7))
        assert t_a[7] == 1 and t_a[12] == 0
        assert torch.equal(t_a[13:17], torch.tensor([0.0, 1, 2, 3]))
        assert torch.equal(t_a[17:24], torch.zeros(7))
        assert t_v[0] == 1 and t_v[5] == 0
        assert torch.equal(t_v[6:10], torch.tensor([0.0, 1, 2, 3]))
        assert torch.equal(t_v[10:18], torch.zeros(8))
        for cen, neutral in ((s["t_a_cen"], t_a), (s["t_v_cen"], t_v)):
            keep = torch.ones(neutral.shape[0], dtype=torch.bool)
            crop = slice(8, 12) if neutral.shape[0] == 24 else slice(1, 5)
            keep[crop] = False  # all but the crop values equal the sample's neutral vector
            assert torch.equal(cen[:, keep], neutral[keep].expand(3, -1))

        i, j, h, w = audio_crop(t_a)
        assert 0 <= i and i + h <= 1024 and 0 <= j and j + w <= 128
        expected = F.resized_crop(s["audio"], i, j, h, w, [1024, 128], antialias=True)
        torch.testing.assert_close(s["audio_aug"], expected, atol=1e-6, rtol=0)

        frame = frame0(ds.entries[index])
        i, j, h, w = visual_crop(t_v, frame.height, frame.width)
        assert 0 <= i and i + h <= frame.height and 0 <= j and j + w <= frame.width
        expected = NORMALIZE(F.to_tensor(F.resized_crop(frame, i, j, h, w, [224, 224])))
        torch.testing.assert_close(s["visual_aug"], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(s["visual"], CLEAN(frame), atol=0, rtol=0)


def test_vectors_reproduce_the_views_when_all_on(synth_small):
    """Re-applying everything t_a / t_v record to the clean inputs gives the augmented views."""
    ds = make(synth_small, "pretrain", probs=AugmentProbs.constant(1.0), frames_per_clip=1)
    ds.seed_worker(1)
    for index in range(3):
        s = ds[index]
        t_a, t_v = s["t_a"], s["t_v"]
        for flag in (0, 5, 7, 12, 21, 23):
            assert t_a[flag] == 1, flag
        for flag in (0, 5, 14, 16, 17):
            assert t_v[flag] == 1, flag

        t0, t1, f0, f1 = (int(v) for v in t_a[1:5])
        assert 0 <= t0 <= t1 <= 1024 and t1 - t0 <= 192
        assert 0 <= f0 <= f1 <= 128 and f1 - f0 <= 48
        x = s["audio"].clone()  # (3, T, F)
        x[:, t0:t1, :] = 0
        x[:, :, f0:f1] = 0
        x = torch.roll(x, int(round(float(t_a[6]) * 1024)), dims=1)
        x = F.resized_crop(x, *audio_crop(t_a), [1024, 128], antialias=True)
        x = jitter(x, t_a[13:17], t_a[17:21])
        sigma = float(t_a[22])
        assert 0.1 <= sigma <= 2.0
        k = 2 * math.ceil(sigma) + 1
        x = F.hflip(F.gaussian_blur(x, [k, k], [sigma, sigma]))
        torch.testing.assert_close(s["audio_aug"], x, atol=1e-4, rtol=0)

        frame = frame0(ds.entries[index])
        img = F.resized_crop(frame, *visual_crop(t_v, frame.height, frame.width), [224, 224])
        img = jitter(img, t_v[6:10], t_v[10:14])
        img = img.filter(ImageFilter.GaussianBlur(radius=float(t_v[15])))
        img = F.rgb_to_grayscale(F.hflip(img), num_output_channels=3)
        expected = NORMALIZE(F.to_tensor(img))
        # The factors pass through float32: allow a rare one-level rounding difference.
        diff = (s["visual_aug"] - expected).abs()
        assert diff.max() <= 1.01 / 255 / 0.224
        assert (diff > 1e-6).float().mean() < 1e-3


def test_sampled_vectors_follow_the_spec_distributions(synth_small):
    n = 400
    ds = make(synth_small, "pretrain", cen_num=n)
    ds.seed_worker(2)
    s = ds[0]
    ta, tv = s["t_a_cen"].double(), s["t_v_cen"].double()

    def rate_ok(flags: torch.Tensor, p: float) -> bool:
        return abs(flags.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)

    for col, p in ((0, 0.8), (5, 0.8), (12, 0.8), (21, 0.5), (23, 0.5)):
        assert rate_ok(ta[:, col], p), col
    for col, p in ((5, 0.8), (14, 0.5), (16, 0.5), (17, 0.2)):
        assert rate_ok(tv[:, col], p), col
    assert (ta[:, 7] == 1).all() and (tv[:, 0] == 1).all()

    on = ta[:, 0] == 1
    assert ((ta[on, 2] - ta[on, 1]) <= 192).all() and ((ta[on, 4] - ta[on, 3]) <= 48).all()
    assert ((ta[on, 6] >= -1) & (ta[on, 6] < 1)).all()
    for t, at in ((ta, 12), (tv, 5)):  # jitter: a permutation, factors in range
        on = t[:, at] == 1
        orders = t[on, at + 1 : at + 5].sort(dim=1).values
        assert (orders == torch.arange(4.0)).all()
        assert (t[on, at + 5 : at + 8].abs() <= 0.4).all() and (t[on, at + 8].abs() <= 0.1).all()
    for t, at in ((ta, 21), (tv, 14)):
        on = t[:, at] == 1
        assert ((t[on, at + 1] >= 0.1) & (t[on, at + 1] <= 2.0)).all()
        assert (t[~on, at + 1] == 0).all()

    # Crops: area fraction in [0.08, 1], aspect w/h in range, or torchvision's fallback crop.
    h, w = ta[:, 10] * 128, ta[:, 11] * 1024  # undo the quirk: frames and bins
    area, aspect = h * w / (1024 * 128), w / h
    in_range = (aspect > 0.1 * 0.95) & (aspect < 0.1875 * 1.05) & (area > 0.075) & (area <= 1)
    assert (in_range | ((h == 1024) & (w == 128))).all()
    area, aspect = tv[:, 3] * tv[:, 4], tv[:, 4] / tv[:, 3]  # drawn on a 224 x 224 image
    assert ((aspect > 0.75 * 0.95) & (aspect < 4 / 3 * 1.05) & (area > 0.075) & (area <= 1)).all()
    assert ((tv[:, 1] + tv[:, 3]) <= 1 + 1e-6).all() and ((tv[:, 2] + tv[:, 4]) <= 1 + 1e-6).all()


# ----------------------------------------------------------------------------------------------
# Finetuning


@pytest.fixture(scope="module")
def two_clips(synth_small, tmp_path_factory):
    """A list of two training clips with different label sets."""
    entries = read_dataset(synth_small.dataset("train"))
    first = entries[0]
    second = next(e for e in entries[1:] if set(e.labels) - set(first.labels))
    path = tmp_path_factory.mktemp("two") / "two.json"
    write_dataset(path, [first, second])
    return path


def test_finetune_mixup_mixes_waves_frames_and_labels(synth_small, two_clips):
    ds = PaperStyleDataset(
        two_clips, synth_small.label_csv, "finetune", MEAN, STD, frames_per_clip=1, eval_frame=0,
        mixup=1.0, noise=False, finetune_specaug=False,
    )  # fmt: skip
    ds.seed_worker(0)
    l0, l1 = ds.labels
    only0 = int(torch.nonzero(l0 * (1 - l1))[0])
    mixed = None
    for _ in range(20):  # the partner is uniform over both clips: find a draw that took clip 1
        s = ds[0]
        if not torch.equal(s["labels"], l0):
            mixed = s
            break
    assert mixed is not None
    lam = float(mixed["labels"][only0])
    assert 0 < lam < 1
    torch.testing.assert_close(mixed["labels"], lam * l0 + (1 - lam) * l1)

    w0, w1 = (torch.from_numpy(soundfile.read(e.wav, dtype="float32")[0]) for e in ds.entries)
    w0, w1 = w0 - w0.mean(), w1 - w1.mean()
    mix = lam * w0 + (1 - lam) * w1
    ref, _ = fbank_of(mix - mix.mean(), 1024)
    torch.testing.assert_close(mixed["audio"][0], ref, atol=1e-4, rtol=0)
    visual = lam * CLEAN(frame0(ds.entries[0])) + (1 - lam) * CLEAN(frame0(ds.entries[1]))
    torch.testing.assert_close(mixed["visual"], visual, atol=1e-5, rtol=0)


def test_finetune_specaugment_masks_one_band_each(synth_small):
    # 256 frames: all real audio (padding frames are already 0 before the norm, masks hide there).
    ds = make(synth_small, "finetune", mixup=0.0, noise=False, target_length=256)
    ds.seed_worker(3)
    ref, _ = reference_fbank(ds.entries[0].wav, 256)
    audio = ds[0]["audio"][0].T  # (128, T)
    masked_value = (0 - MEAN) / STD  # masks zero the log-mel before normalisation, as CAV-MAE
    at_mask = (audio - masked_value).abs() < 1e-5
    rows = at_mask.all(dim=1).nonzero().flatten()  # mel bins masked over all time
    cols = at_mask.all(dim=0).nonzero().flatten()  # frames masked over all bins
    assert 0 < len(rows) <= 48 and 0 < len(cols) <= 192
    for idx in (rows, cols):  # each mask is one contiguous band
        assert idx[-1] - idx[0] + 1 == len(idx)
    band = torch.zeros_like(at_mask)
    band[rows, :] = True
    band[:, cols] = True
    torch.testing.assert_close(audio[~band], ref.T[~band], atol=1e-5, rtol=0)  # the rest intact


# ----------------------------------------------------------------------------------------------
# Loader, seeding, costs


class _ThreadProbe(torch.utils.data.Dataset):
    """Reports the torch thread count each item was produced with."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.seen.append(torch.get_num_threads())
        return {"labels": torch.tensor([float(torch.get_num_threads())])}


def test_loader_two_workers(synth_small):
    ds = make(synth_small, "pretrain", cen_num=2)
    first = []
    for _ in range(2):  # the same seeds give the same batches
        loader = make_loader(ds, batch_size=2, workers=2, seed=0)
        batches = list(itertools.islice(loader, 2))
        first.append(batches[0])
        b = batches[0]
        assert b["audio"].shape == (2, 3, 1024, 128) and b["visual_aug"].shape == (2, 3, 224, 224)
        assert b["t_a"].shape == (2, 24) and b["t_v_cen"].shape == (2, 2, 18)
        # Batches 0 and 1 come from workers 0 and 1: differently seeded draws.
        assert not torch.equal(batches[0]["t_a"], batches[1]["t_a"])
    for key in first[0]:
        assert torch.equal(first[0][key], first[1][key]), key
    stats = measure(loader, batches=3, warmup=1)  # timed in whole rounds of the 2 workers: 4
    assert stats["batches"] == 4 and stats["samples"] == 8 and stats["workers"] == 2
    assert stats["ms_per_sample_per_core"] == pytest.approx(2000 * stats["seconds"] / 8)

    probe = make_loader(_ThreadProbe(), batch_size=1, workers=2, shuffle=False)
    assert [float(b["labels"]) for b in probe] == [1.0] * 4


def test_each_epochs_new_workers_draw_afresh_and_runs_repeat(synth_small):
    """The workers end with each epoch (as the original's DataLoader's do): the next epoch's
    are seeded anew from the loader's seeded generator, so epochs differ and a run repeats."""
    ds = make(synth_small, "pretrain", cen_num=0)

    def two_epochs() -> list[torch.Tensor]:
        loader = make_loader(ds, batch_size=4, workers=2, shuffle=False, seed=1)
        return [torch.cat([b["t_a"] for b in loader]) for _ in range(2)]

    first, again = two_epochs(), two_epochs()
    assert not torch.equal(first[0], first[1])  # the same clips, new draws
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_unused_work_draws_each_cen_crop_on_a_random_image(synth_small, monkeypatch):
    """With ``unused_work`` (the default) every ``cen_num`` crop is drawn on a fresh random
    image of the original's sizes (audio: frames x bins; visual: the output size), as the
    original's ``sample_t_a`` / ``sample_t_v`` do; lean, on a free stand-in. The vectors follow
    the same rules either way."""
    import bench.baseline as baseline

    real, made = baseline.random_canvas, []

    def recording(height, width):
        made.append((height, width))
        return real(height, width)

    monkeypatch.setattr(baseline, "random_canvas", recording)
    canvas = real(5, 7)
    assert canvas.shape == (3, 5, 7) and 0 <= canvas.min() and canvas.max() < 1
    assert not torch.equal(canvas, real(5, 7))  # fresh random numbers: the original's cost
    for unused_work, want in ((True, [(1024, 128)] * 3 + [(224, 224)] * 3), (False, [])):
        made.clear()
        ds = make(synth_small, "pretrain", unused_work=unused_work)
        ds.seed_worker(0)
        s = ds[0]
        assert made == want
        for t in s["t_a_cen"]:
            i, j, h, w = audio_crop(t)
            assert 0 <= i and i + h <= 1024 and 0 <= j and j + w <= 128
        for t in s["t_v_cen"]:
            i, j, h, w = visual_crop(t, 224, 224)
            assert 0 <= i and i + h <= 224 and 0 <= j and j + w <= 224


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_finetuning_makes_the_originals_unused_outputs(synth_small, mixup):
    """Finetuning with ``unused_work``: the outputs the original's ``__getitem__`` makes with
    its augmentations off, the fbank repeated (equal to the clean audio, mixed or not) and a
    frame of the clip decoded and normalised at its own size; lean, none."""
    ds = make(synth_small, "finetune", mixup=mixup, noise=False)
    ds.seed_worker(0)
    s = ds[0]
    assert torch.equal(s["unused_audio"], s["audio"])
    assert s["unused_audio"].shape == (3, 1024, 128)
    assert torch.equal(s["unused_audio"][0], s["unused_audio"][2])
    frames = []
    for k in range(FRAMES_PER_CLIP):
        with Image.open(ds.entries[0].frame_path(k)) as img:
            frames.append(NORMALIZE(F.to_tensor(img.convert("RGB"))))
    assert any(torch.equal(s["unused_visual"], f) for f in frames)
    lean = make(synth_small, "finetune", mixup=mixup, unused_work=False)
    lean.seed_worker(0)
    assert not [k for k in lean[0] if k.startswith("unused_")]


def test_batches_reach_the_device_as_the_originals_step_takes_them(synth_small):
    """The original's DataLoader: no pinned memory, workers that end with the epoch; its
    collation, except that unused frames of different sizes stay a list; its step copies what
    it reads (not the unused outputs) and transposes the fbank images to (B, 3, 128, T)."""
    from bench.baseline import batch_to_device, collate

    ds = make(synth_small, "finetune", cen_num=0)
    loader = make_loader(ds, batch_size=2, workers=2)
    assert not loader.pin_memory and not loader.persistent_workers
    assert loader.collate_fn is collate

    def sample(width):
        return {
            "audio": torch.randn(3, 16, 8),
            "labels": torch.ones(4),
            "unused_visual": torch.zeros(3, 6, width),
        }

    same = collate([sample(5), sample(5)])
    assert same["unused_visual"].shape == (2, 3, 6, 5)
    ragged = collate([sample(5), sample(7)])
    assert [tuple(v.shape) for v in ragged["unused_visual"]] == [(3, 6, 5), (3, 6, 7)]
    moved = batch_to_device(ragged, "cpu")
    assert set(moved) == {"audio", "labels"}
    assert moved["audio"].shape == (2, 3, 8, 16)
    assert torch.equal(moved["audio"], ragged["audio"].transpose(2, 3))
    real = next(iter(make_loader(make(synth_small, "pretrain", cen_num=2), 2, 0)))
    on_device = batch_to_device(real, "cpu")
    for key in ("audio", "audio_aug"):
        assert torch.equal(on_device[key], real[key].transpose(2, 3))
        assert on_device[key].shape == (2, 3, 128, 1024)
    assert torch.equal(on_device["t_a_cen"], real["t_a_cen"])


def test_per_sample_cost_runs_on_one_thread():
    probe = _ThreadProbe()
    threads = torch.get_num_threads()
    assert per_sample_cost(probe, n=3, warmup=1) > 0
    assert probe.seen == [1] * 4
    assert torch.get_num_threads() == threads


def test_seed_worker_repeats_the_draws(synth_small):
    ds = make(synth_small, "pretrain", cen_num=1)
    draws = []
    for worker in (0, 0, 1):
        ds.seed_worker(worker)
        draws.append(ds[0])
    assert all(torch.equal(draws[0][k], draws[1][k]) for k in draws[0])
    assert not torch.equal(draws[0]["t_a"], draws[2]["t_a"])


def test_bad_input_names_the_file(synth_small, tmp_path):
    entries = read_dataset(synth_small.dataset("train"))[:1]
    not_audio = tmp_path / "not_audio.wav"
    not_audio.write_text("this is not a wav file")
    bad = tmp_path / "bad_wav.json"
    write_dataset(bad, [entries[0].__class__(**{**entries[0].__dict__, "wav": str(not_audio)})])
    ds = PaperStyleDataset(bad, synth_small.label_csv, "eval", MEAN, STD, 1024, 4, 2)
    with pytest.raises(ValueError, match="not_audio.wav"):
        ds[0]
    unknown = tmp_path / "unknown_label.json"
    write_dataset(unknown, [entries[0].__class__(**{**entries[0].__dict__, "labels": ("/m/x",)})])
    with pytest.raises(DatasetError, match="unknown_label.json"):
        PaperStyleDataset(unknown, synth_small.label_csv, "eval", MEAN, STD, 1024, 4, 2)


# ----------------------------------------------------------------------------------------------
# PyAV seek-and-decode


@pytest.fixture(scope="module")
def long_webm(tmp_path_factory):
    """One 8 s VP9 clip (keyframes every 2 s), so that k = 7 needs a seek past three keyframes."""
    root = tmp_path_factory.mktemp("webm8")
    info = synth.generate(root, clips=1, classes=2, seed=3, video_format="webm", seconds=8.0,
                          test_fraction=0.0, workers=1)  # fmt: skip
    return read_dataset(info.dataset("train", "webm"))[0].video_path


def test_seek_decode_matches_decoding_from_the_start(long_webm):
    with av.open(long_webm) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 200
    for k in (0, 3, 7):
        index = synth.frame_index(k)
        got = np.asarray(seek_decode_frame(long_webm, k + 0.5))
        assert np.array_equal(got, frames[index]), k
        assert not np.array_equal(got, frames[index + 1]) and not np.array_equal(
            got, frames[index - 1]
        )
    assert np.array_equal(np.asarray(seek_decode_frame(long_webm, 60.0)), frames[-1])
