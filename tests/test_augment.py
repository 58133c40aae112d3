"""Pretraining augmentations: the t-vectors tell the truth, and the draws follow the spec.

Truthfulness: the reference is ``torchvision.transforms.functional`` (plus torch for the masks,
roll and flip) applied to the clean view (audio) or the decoded frame (visual) with the values
read back from t_a / t_v alone; nothing from our code. It must reproduce the views the loader
produced, for many seeds and every flag forced on and off.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dali_pipelines import augment
from dali_pipelines.loader import DaliLoader, LoaderConfig
from equiav.config import AugmentConfig
from equiav.data.index import read_dataset, read_label_csv
from tests.signals import kaldi_fbank

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def draw_one(seed, epoch, position, *args, **kwargs):
    """One pretraining sample's draws: a block of one position."""
    return augment.draw_pretrain_block(seed, epoch, [position], *args, **kwargs)


def reference_audio(clean: torch.Tensor, t: torch.Tensor, shift_applied: bool = True):
    """The augmented (3, T, F) view from the clean one and t_a, with torchvision."""
    x = clean.clone()
    frames, bins = x.shape[1], x.shape[2]
    t = t.double()
    if t[0] > 0:
        x[:, int(t[1]) : int(t[2]), :] = 0
        x[:, :, int(t[3]) : int(t[4])] = 0
        if shift_applied:
            x = torch.roll(x, int(round(float(t[6]) * frames)), dims=1)
    # The original's swapped scaling: i and h are divided by F, j and w by T.
    i, j = round(float(t[8]) * bins), round(float(t[9]) * frames)
    h, w = round(float(t[10]) * bins), round(float(t[11]) * frames)
    x = TF.resized_crop(x, i, j, h, w, [frames, bins], InterpolationMode.BILINEAR, antialias=True)
    x = _jitter(x, t[12:21])
    if t[21] > 0:
        sigma = float(t[22].float())
        x = TF.gaussian_blur(x, [2 * math.ceil(sigma) + 1] * 2, [sigma, sigma])
    if t[23] > 0:
        x = TF.hflip(x)
    return x


def _jitter(x, t):
    if t[0] > 0:
        factors = [
            float(t[5].float()) + 1,
            float(t[6].float()) + 1,
            float(t[7].float()) + 1,
            float(t[8].float()),
        ]
        for op in t[1:5].long().tolist():
            x = ADJUST[op](x, factors[op])
    return x


def reference_visual(frame: torch.Tensor, t: torch.Tensor, size: int):
    """The augmented visual view from the decoded (3, H, W) frame in [0, 1] and t_v."""
    height, width = frame.shape[1:]
    i, j = round(float(t[1]) * height), round(float(t[2]) * width)
    h, w = round(float(t[3]) * height), round(float(t[4]) * width)
    x = TF.resized_crop(frame, i, j, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    x = _jitter(x, t[5:14])
    if t[14] > 0:
        sigma = float(t[15])
        x = TF.gaussian_blur(x, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
    if t[16] > 0:
        x = TF.hflip(x)
    if t[17] > 0:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return TF.normalize(x, MEAN, STD)


FLAGS = {
    "default": {},
    "all_on": dict(specaug_p=1.0, jitter_p=1.0, blur_p=1.0, flip_p=1.0, gray_p=1.0),
    "all_off": dict(specaug_p=0.0, jitter_p=0.0, blur_p=0.0, flip_p=0.0, gray_p=0.0),
}


def pretrain_batches(info, aug, seed, batches=2, shift_applied=True, cen_num=3):
    cfg = LoaderConfig(
        batch_size=4,
        mode="pretrain",
        seed=seed,
        frames_per_clip=4,
        eval_frame=2,
        augment=aug,
        cen_num=cen_num,
        time_shift_applied=shift_applied,
    )
    entries = read_dataset(info.root / "train.json")
    loader = DaliLoader(entries, read_label_csv(info.label_csv), cfg)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            break
    return loader, out


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_vectors_reproduce_the_augmented_views(synth_small, flags, seed, selection):
    aug = dataclasses.replace(AugmentConfig(), **FLAGS[flags])
    loader, batches = pretrain_batches(synth_small, aug, seed)
    for batch in batches:
        assert batch["audio_aug"].shape == batch["audio"].shape
        assert batch["audio_aug"].is_contiguous()  # one layout whatever the draws (compile)
        assert batch["visual_aug"].shape == batch["visual"].shape == (4, 3, 224, 224)
        assert batch["t_a"].shape == (4, 24) and batch["t_v"].shape == (4, 18)
        assert batch["t_a_cen"].shape == (4, 3, 24) and batch["t_v_cen"].shape == (4, 3, 18)
        for b in range(4):
            clean = batch["audio"][b].transpose(1, 2)  # (3, T, F)
            got = batch["audio_aug"][b].transpose(1, 2)
            want = reference_audio(clean, batch["t_a"][b])
            # Interpolation in float32 by the same formula: agreement to rounding (1e-4 in
            # normalised-fbank units, whose range is about +-3).
            assert (got - want).abs().max() < 1e-4, (flags, b)
            entry = loader.entries[int(batch["index"][b])]
            k = int(batch["frame_k"][b, 1])
            frame = TF.to_tensor(Image.open(entry.frame_path(k)).convert("RGB"))
            want_v = reference_visual(frame, batch["t_v"][b], 224)
            # DALI's antialiased bilinear resize vs torchvision's tensor path: mean < 0.5/255,
            # pixels < 6/255 (in normalised units: divided by the std, ~0.226).
            diff = (batch["visual_aug"][b] - want_v).abs() * 0.226
            assert diff.mean() < 0.5 / 255 and diff.max() < 6 / 255, (flags, b, diff.mean())


def test_wrong_axis_or_order_is_caught(synth_small):
    aug = dataclasses.replace(AugmentConfig(), **FLAGS["all_on"])
    _, batches = pretrain_batches(synth_small, aug, seed=3, batches=1)
    batch = batches[0]
    clean = batch["audio"][0].transpose(1, 2)
    got = batch["audio_aug"][0].transpose(1, 2)
    t = batch["t_a"][0].clone()
    swapped = t.clone()
    swapped[13:17] = t[13:17].flip(0)  # another jitter order
    assert (reference_audio(clean, swapped) - got).abs().max() > 1e-3
    crop = t.clone()
    crop[8], crop[9] = t[9], t[8]  # crop offsets on the wrong axes
    assert (reference_audio(clean, crop) - got).abs().max() > 1e-3


def test_paper_exact_time_shift_is_recorded_but_not_applied(synth_small):
    aug = dataclasses.replace(AugmentConfig(), **FLAGS["all_on"])
    _, batches = pretrain_batches(synth_small, aug, seed=0, batches=1, shift_applied=False)
    batch = batches[0]
    for b in range(4):
        t = batch["t_a"][b]
        assert t[5] == 1 and t[0] == 1
        clean = batch["audio"][b].transpose(1, 2)
        got = batch["audio_aug"][b].transpose(1, 2)
        assert (reference_audio(clean, t, shift_applied=False) - got).abs().max() < 1e-4


def test_resume_mid_epoch_through_the_augmenting_pipeline(synth_small):
    aug = AugmentConfig()
    cfg = LoaderConfig(
        batch_size=2,
        mode="pretrain",
        seed=5,
        frames_per_clip=4,
        eval_frame=2,
        augment=aug,
        cen_num=2,
    )
    entries = read_dataset(synth_small.root / "train.json")
    labels = read_label_csv(synth_small.label_csv)
    loader = DaliLoader(entries, labels, cfg)
    straight = [b for _ in range(2) for b in loader][:6]
    first = DaliLoader(entries, labels, cfg)
    done = []
    for b in first:
        done.append(b)
        if len(done) == 3:
            break
    resumed = DaliLoader(entries, labels, cfg, state=first.state_dict())
    rest = [b for b in resumed][:1]
    for b in resumed:
        rest.append(b)
        if len(rest) == 3:
            break
    for x, y in zip(done + rest, straight, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k


# ---- distributions of the draws (no DALI) ----------------------------------------------------


def _draws(n=4000, frames=1024, bins=128):
    """Half of the draws as the source makes them (``draw_pretrain_block``: per sample the applied
    rows and, for audio, three cen rows), half in one vectorised call: both must follow the
    spec."""
    aug = AugmentConfig()
    half = n // 2
    args = (aug, frames, bins, 192, 48, (240, 320), 224)
    with_cen = [draw_one(0, 0, p, *args, cen_num=3) for p in range(half // 4)]
    batch = augment.draw_audio(np.random.default_rng(1), aug, frames, bins, 192, 48, n=half)
    ta = np.concatenate([d.audio.t for d in with_cen] + [batch.t])
    a_crops = np.concatenate([d.audio.crop for d in with_cen] + [batch.crop])
    # The applied visual rows (on the 240 x 320 frame; the cen rows use the 224 square).
    applied = [draw_one(1, 0, p, *args, cen_num=0).visual for p in range(half)]
    vbatch = augment.draw_visual(np.random.default_rng(2), aug, 240, 320, n=half)
    tv = np.concatenate([v.t for v in applied] + [vbatch.t])
    v_crops = np.concatenate([v.crop for v in applied] + [vbatch.crop])
    return ta, tv, a_crops, v_crops


def test_audio_draws_follow_the_spec():
    ta, _, audio, _ = _draws()
    on = ta[:, 0] == 1
    assert abs(on.mean() - 0.8) < 0.03
    assert (ta[~on, :7] == 0).all()
    width = ta[on, 2] - ta[on, 1]
    assert width.min() >= 0 and width.max() <= 191 and abs(width.mean() - 95.5) < 5
    assert ta[on, 1].min() >= 0 and ta[on, 2].max() <= 1024
    fw = ta[on, 4] - ta[on, 3]
    assert fw.max() <= 47 and ta[on, 4].max() <= 128
    shifts = ta[on, 6] * 1024
    assert shifts.min() >= -1024 and shifts.max() < 1024 and abs(shifts.mean()) < 40
    assert np.allclose(shifts, np.round(shifts))
    assert (ta[:, 7] == 1).all()
    crops = audio
    i, j, h, w = crops.T
    assert (i + h <= 1024).all() and (j + w <= 128).all() and (h > 0).all() and (w > 0).all()
    ratio, area = w / h, h * w / (1024 * 128)
    assert ratio.min() >= 0.1 - 0.02 and ratio.max() <= 0.1875 + 0.02
    assert area.min() >= 0.07 and area.max() <= 1.0
    np.testing.assert_allclose(ta[:, 8], i / 128)  # the quirk: time offset over F
    np.testing.assert_allclose(ta[:, 9], j / 1024)
    _check_jitter(ta[:, 12:21])
    _check_bernoulli(ta[:, 21], 0.5)
    sig = ta[ta[:, 21] == 1, 22]
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.05
    _check_bernoulli(ta[:, 23], 0.5)


def test_visual_draws_follow_the_spec():
    _, tv, _, visual = _draws()
    assert (tv[:, 0] == 1).all()
    crops = visual
    i, j, h, w = crops.T
    assert (i + h <= 240).all() and (j + w <= 320).all()
    ratio = w / h
    assert ratio.min() >= 0.75 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    np.testing.assert_allclose(
        tv[:, 1:5], np.stack([i / 240, j / 320, h / 240, w / 320], 1), rtol=1e-6
    )
    _check_jitter(tv[:, 5:14])
    _check_bernoulli(tv[:, 14], 0.5)
    _check_bernoulli(tv[:, 16], 0.5)
    _check_bernoulli(tv[:, 17], 0.2)


def test_pretrain_draws_cen_rows_on_the_image_square_and_reproducible():
    """The pretraining draws' visual cen rows are crops of the image_size square, scaled by it, with
    the spec's distributions; its draws are a pure function of (seed, epoch, position)."""
    aug = AugmentConfig()
    args = (aug, 1024, 128, 192, 48, (240, 320), 224)
    draws = [draw_one(0, 0, p, *args, cen_num=16) for p in range(300)]
    tv = np.concatenate([d.visual.t[1:] for d in draws])
    crops = np.concatenate([d.visual.crop[1:] for d in draws])
    i, j, h, w = crops.T
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= 224).all() and (j + w <= 224).all()
    assert (w / h).min() >= 0.75 - 0.05 and (w / h).max() <= 4 / 3 + 0.05
    assert (h * w).max() > 0.9 * 224 * 224  # crops of nearly the whole square occur
    np.testing.assert_allclose(tv[:, 1:5], crops / 224, rtol=1e-6)
    _check_jitter(tv[:, 5:14])
    _check_bernoulli(tv[:, 14], 0.5)
    _check_bernoulli(tv[:, 17], 0.2)
    first = np.stack([d.visual.crop[0] for d in draws])
    assert (first[:, 0] + first[:, 2] <= 240).all() and (first[:, 1] + first[:, 3] <= 320).all()
    assert (first[:, 1] + first[:, 3] > 224).any()  # row 0 is drawn on the 240 x 320 frame
    again = draw_one(0, 0, 7, *args, cen_num=16)
    assert np.array_equal(again.audio.t, draws[7].audio.t) and again.roll == draws[7].roll
    assert np.array_equal(again.visual.t, draws[7].visual.t)
    other = draw_one(0, 1, 7, *args, cen_num=16)  # the next epoch
    assert not np.array_equal(other.audio.t, draws[7].audio.t)
    rolls = np.concatenate([d.roll for d in draws])
    assert rolls.min() >= -1024 and rolls.max() < 1024 and len(set(rolls.tolist())) > 250


def _check_bernoulli(x, p):
    assert set(np.unique(x)) <= {0.0, 1.0}
    assert abs(x.mean() - p) < 0.03


def _check_jitter(j):
    on = j[:, 0] == 1
    _check_bernoulli(j[:, 0], 0.8)
    assert (np.sort(j[on, 1:5], 1) == [0, 1, 2, 3]).all()
    assert (j[~on, 1:5] == [0, 1, 2, 3]).all() and (j[~on, 5:] == 0).all()
    firsts = np.bincount(j[on, 1].astype(int), minlength=4) / on.sum()
    assert np.abs(firsts - 0.25).max() < 0.04  # every order equally likely
    for col, bound in ((5, 0.4), (6, 0.4), (7, 0.4), (8, 0.1)):
        v = j[on, col]
        assert v.min() >= -bound and v.max() <= bound and abs(v.mean()) < bound / 10


def test_rrc_params_match_torchvision_distribution():
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ours = np.array(augment.rrc_params(rng, 1024, 128, (0.08, 1.0), (0.1, 0.1875), n=3000))
    img = torch.empty(1, 1024, 128)
    ref = np.array(
        [RandomResizedCrop.get_params(img, [0.08, 1.0], [0.1, 0.1875]) for _ in range(3000)]
    )
    for col in range(4):
        q = [0.1, 0.5, 0.9]
        np.testing.assert_allclose(
            np.quantile(ours[:, col], q), np.quantile(ref[:, col], q), rtol=0.12, atol=3
        )


def test_neutral_vectors():
    assert augment.neutral_audio().tolist()[13:17] == [0, 1, 2, 3]
    assert augment.neutral_visual().tolist()[6:10] == [0, 1, 2, 3]
    assert augment.neutral_audio().sum() == 6 and augment.neutral_visual().sum() == 6


@pytest.mark.parametrize("mode", ["pretrain", "finetune", "eval"])
def test_preview_writes_valid_pngs(synth_small, tmp_path, mode):
    from dali_pipelines.preview import main

    name = "test.json" if mode == "eval" else "train.json"
    args = [
        str(synth_small.root / name),
        "--mode",
        mode,
        "--out",
        str(tmp_path),
        "--samples",
        "2",
        "--set",
        "data.clip_seconds=4.0",
        "--set",
        "data.frames_per_clip=4",
        "--set",
        "data.eval_frame=2",
        "--set",
        "eval.retrieval_frame=2",
        "--set",
        "data.dataset=synthetic",
        "--set",
        "data.audio_mean=-4.346",
        "--set",
        "data.audio_std=4.332",
    ]
    assert main(args) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    for p in pngs:
        img = Image.open(p)
        img.verify()
        assert img.size[0] > 300


def test_vector_descriptions_read_back_the_numbers():
    from dali_pipelines.preview import describe_audio, describe_visual

    t = augment.neutral_audio()
    assert "specaug off" in describe_audio(t) and "jitter off" in describe_audio(t)
    tv = augment.neutral_visual()
    tv[5:10] = (1, 2, 0, 3, 1)
    tv[10] = 0.12
    assert "jitter on, order 2,0,3,1 (b=+0.12" in describe_visual(tv)


def test_finetune_mixup_label_arithmetic_and_partner_draws(synth_small):
    """Labels are lam * own + (1 - lam) * partner's, lam ~ Beta(10, 10), mixing with p 0.5."""
    from dali_pipelines.sources import SampleSource, Shard, SourceSpec

    entries = read_dataset(synth_small.root / "train.json")
    labels = read_label_csv(synth_small.label_csv)
    spec = SourceSpec(
        entries,
        labels,
        batch_size=2,
        shard=Shard(),
        mode="finetune",
        augment=AugmentConfig(),
        frames=512,
        frames_per_clip=4,
    )
    source = SampleSource(spec)
    lams, mixed = [], 0
    for position in range(400):
        out = source._mixup(position % len(entries), epoch=0, i=position)
        lam = float(out["lam"])
        own = labels.multi_hot(entries[position % len(entries)].labels)
        partner = labels.multi_hot(entries[int(out["partner"])].labels)
        np.testing.assert_allclose(out["labels"], lam * own + (1 - lam) * partner, atol=1e-6)
        if lam < 1.0:
            mixed += 1
            lams.append(lam)
        t0, t1, f0, f1 = out["ft_params"][1:].tolist()
        assert 0 <= t1 - t0 <= 192 and 0 <= f1 - f0 <= 48 and t1 <= 512 and f1 <= 128
    assert abs(mixed / 400 - 0.5) < 0.08
    # Beta(10, 10): mean 0.5, standard deviation 1 / sqrt(4 * 21) = 0.109
    assert abs(np.mean(lams) - 0.5) < 0.03 and abs(np.std(lams) - 0.109) < 0.02


def test_finetune_batches_mix_frames_after_normalisation(synth_small):
    """The finetune visual equals lam * clean(own) + (1 - lam) * clean(partner)."""
    cfg = LoaderConfig(
        batch_size=4,
        mode="finetune",
        seed=2,
        frames_per_clip=4,
        eval_frame=2,
        augment=dataclasses.replace(AugmentConfig(), mixup=1.0),
    )
    entries = read_dataset(synth_small.root / "train.json")
    loader = DaliLoader(entries, read_label_csv(synth_small.label_csv), cfg)
    batch = next(iter(loader))
    source = loader.source
    for b in range(4):
        draw = source._mixup(int(batch["index"][b]), 0, b)  # first batch of epoch 0, one process
        lam = float(draw["lam"])
        own = entries[int(batch["index"][b])]
        partner = entries[int(draw["partner"])]
        views = []
        for entry, k in (
            (own, int(batch["frame_k"][b, 0])),
            (partner, int(batch["frame_k"][b, 1])),
        ):
            img = Image.open(entry.frame_path(k)).convert("RGB")
            t = TF.to_tensor(TF.center_crop(TF.resize(img, 224, InterpolationMode.BICUBIC), 224))
            views.append(TF.normalize(t, MEAN, STD))
        want = lam * views[0] + (1 - lam) * views[1]
        assert (batch["visual"][b] - want).abs().mean() < 1.5 / 255 / 0.226
        np.testing.assert_allclose(batch["labels"][b].numpy(), draw["labels"], atol=1e-6)


def test_finetune_audio_is_rolled_and_masked_with_the_log_mels_zero(synth_small):
    """Finetuning's clean audio: the normalised Kaldi fbank (torchaudio's), rolled along time
    by the drawn shift, its SpecAugment bands holding the log-mel's zero after the
    normalisation, -mean / std (masked before the normalisation, as the original's recipe and
    the paper-style loader do), not 0."""
    from bench.baseline import read_waveform

    audio_mean, audio_std = -4.346, 4.332
    cfg = LoaderConfig(
        batch_size=4,
        mode="finetune",
        seed=5,
        frames_per_clip=4,
        eval_frame=2,
        audio_mean=audio_mean,
        audio_std=audio_std,
        augment=dataclasses.replace(AugmentConfig(), mixup=0.0),
    )
    entries = read_dataset(synth_small.root / "train.json")
    loader = DaliLoader(entries, read_label_csv(synth_small.label_csv), cfg)
    batch = next(iter(loader))
    fill = (0.0 - audio_mean) / audio_std
    banded = 0
    for b in range(4):
        draw = loader.source._mixup(int(batch["index"][b]), 0, b)
        shift, t0, t1, f0, f1 = draw["ft_params"].tolist()
        wave = read_waveform(entries[int(batch["index"][b])].wav)
        fbank = kaldi_fbank(wave - wave.mean())
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, cfg.target_frames - len(fbank)))
        want = torch.roll((fbank - audio_mean) / audio_std, shift, 0)
        want[t0:t1, :] = fill
        want[:, f0:f1] = fill
        got = batch["audio"][b, 0].T  # (T, 128)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        banded += (t1 - t0) + (f1 - f0)
    assert banded > 0  # some band was drawn: the fill was checked


def test_rrc_fallback_is_torchvisions_centre_crop():
    from torchvision.transforms import RandomResizedCrop

    img = torch.empty(1, 4, 400)  # no crop of area >= 90 % and ratio ~1 fits 4 rows
    want = RandomResizedCrop.get_params(img, [0.9, 1.0], [0.75, 4 / 3])
    got = augment.rrc_params(np.random.default_rng(0), 4, 400, (0.9, 1.0), (0.75, 4 / 3), n=3)
    assert [tuple(row) for row in got.tolist()] == [tuple(want)] * 3


def test_sample_rng_is_uniform_and_a_pure_function_of_the_position():
    """SampleRNG: uniform doubles in [0, 1) and integers in [low, high) with the right moments;
    a sample's numbers are the same in any block and at any place in it; other seeds, epochs,
    purposes, calls, rows and elements give other numbers; a size that does not hold the
    block's rows is refused."""
    rng = augment.SampleRNG(3, 1, range(1000), "pretrain")
    u = rng.uniform(size=(2000, 50)).reshape(1000, 2, 50)  # samples x 2 rows x 50 elements
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002

    # Neighbours (50,000-100,000 pairs each: a correlation's spread is ~0.004) are unrelated.
    def corr(a, b):
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert corr(u[:, 0], u[:, 1]) < 0.015  # rows
    assert corr(u[:, :, :-1], u[:, :, 1:]) < 0.015  # elements
    assert corr(u[:-1], u[1:]) < 0.015  # positions
    k = rng.integers(-5, 7, size=1000 * 3)
    counts = np.bincount(k + 5, minlength=12)
    assert k.min() == -5 and k.max() == 6 and counts.min() > 180 and counts.max() < 330
    # The same sample drawn alone, or in another block at another place: the same numbers.
    alone = augment.SampleRNG(3, 1, [417], "pretrain")
    assert np.array_equal(alone.uniform(size=(2, 50)), u[417])
    mixed = augment.SampleRNG(3, 1, [9, 417, 5], "pretrain")
    assert np.array_equal(mixed.uniform(size=(6, 50)).reshape(3, 2, 50)[1], u[417])
    assert np.array_equal(alone.integers(-5, 7, size=3), k[417 * 3 : 418 * 3])  # the next call
    for other in [(4, 1, "pretrain"), (3, 2, "pretrain"), (3, 1, "frames")]:
        assert not np.array_equal(
            augment.SampleRNG(*other[:2], [417], other[2]).uniform(size=(2, 50)), u[417]
        )
    # The layout is part of the counter: one row of 100 elements is not two rows of 50.
    flat = augment.SampleRNG(3, 1, [417], "pretrain").uniform(size=(1, 100))
    assert not np.array_equal(flat, u[417].reshape(1, 100))
    with pytest.raises(ValueError, match="first axis"):
        rng.uniform(size=(999, 2))


def test_pretrain_block_draws_equal_the_samples_drawn_one_by_one():
    """The source draws a batch-sized block at once: each sample's draws (every row, crop,
    shift and roll) equal those of its position drawn alone."""
    aug = AugmentConfig()
    args = (aug, 1024, 128, 192, 48, (240, 320), 224, 3)
    positions = [7, 300, 2, 41]
    block = augment.draw_pretrain_block(5, 2, positions, *args)
    for b, p in enumerate(positions):
        one, mine = draw_one(5, 2, p, *args), block.sample(b)
        for x, y in [
            (one.audio.t, mine.audio.t),
            (one.audio.crop, mine.audio.crop),
            (one.audio.shift, mine.audio.shift),
            (one.visual.t, mine.visual.t),
            (one.visual.crop, mine.visual.crop),
            (one.roll, mine.roll),
        ]:
            assert x.shape[0] in (1, 4) and np.array_equal(x, y), (b, p)
    assert not np.array_equal(block.sample(0).audio.t, block.sample(1).audio.t)


@pytest.mark.parametrize("rank, offset", [(0, 0), (1, 2)])
def test_source_sends_each_position_its_own_draws(synth_small, rank, offset):
    """The source draws per batch-sized block; every sample it sends carries the draws of its
    own global position (frames, t-vectors, crops, roll), as drawn for that position alone,
    also for a rank of two, an epoch's start offset and positions past a block's end."""
    from types import SimpleNamespace

    from dali_pipelines.sources import SampleSource, Shard, SourceSpec, frame_draws

    entries = read_dataset(synth_small.root / "train.json")
    aug = AugmentConfig()
    spec = SourceSpec(
        entries,
        read_label_csv(synth_small.label_csv),
        batch_size=2,
        shard=Shard(rank, 2),
        mode="pretrain",
        seed=4,
        augment=aug,
        frames=512,
        frames_per_clip=4,
        start_epoch=2,
        start_offset=offset,
        cen_num=2,
    )
    source = SampleSource(spec)
    assert len(source) == (4 if offset == 0 else 2)  # 8 entries, 2 ranks, batches of 2
    # Out of order and again, as DALI's parallel workers may ask.
    for i in [3, 0, 1, 2, 0, 3] if offset == 0 else [1, 0, 1]:
        info = SimpleNamespace(epoch_idx=0, idx_in_epoch=i)
        out = source.sample(info)
        assert set(out) >= set(source.output_names)
        # What DALI is handed: the media, then the rest packed, which unpacks to the same.
        fed = dict(zip(source.feed_names, source(info), strict=True))
        unpacked = source.unpack(fed["meta"][None])
        assert set(unpacked) | set(fed) - {"meta"} == set(source.output_names)
        for name, value in unpacked.items():
            assert value.dtype == np.asarray(out[name]).dtype, name
            assert np.array_equal(value[0], out[name]), name
        gpos = offset + 2 * i + rank
        assert out["frame_k"].tolist() == frame_draws(4, 2, gpos, 2, 4)
        size = Image.open(entries[int(out["index"])].frame_path(int(out["frame_k"][1]))).size
        want = draw_one(4, 2, gpos, aug, 512, 128, aug.time_mask, aug.freq_mask, size[::-1], 224, 2)
        assert np.array_equal(out["t_a"], want.audio.t[0])
        assert np.array_equal(out["t_v_cen"], want.visual.t[1:])
        assert out["vcrop"].tolist() == want.visual.crop[0].tolist()
        assert out["a_params"].tolist() == [
            int(want.roll[0]),
            *want.audio.crop[0],
            want.audio.shift[0],
        ]
    # A draw of the wrong size is refused by name before DALI sees it.
    bad = source.sample(SimpleNamespace(epoch_idx=0, idx_in_epoch=0))
    bad["t_a"] = bad["t_a"][:-1]
    with pytest.raises(ValueError, match="'t_a' has shape"):
        source._pack(bad)
    with pytest.raises(ValueError, match="meta must have shape"):
        source.unpack(np.zeros((2, source.meta_size - 1)))


@pytest.mark.parametrize("a, b", [(10.0, 10.0), (0.4, 0.4), (2.0, 5.0), (1.0, 0.7)])
def test_sample_rng_beta_follows_numpy_beta(a, b):
    """SampleRNG.beta (Marsaglia-Tsang gammas, a fixed number of tries): the same distribution
    as numpy's Beta(a, b) (two-sample Kolmogorov-Smirnov distance below the 1 % critical value
    for 20,000 draws each, ~0.016; Beta(10, 10) against Beta(8, 8) is ~0.03) and the right
    mean; in (0, 1)."""
    n = 20000
    ours = augment.SampleRNG(1, 2, range(n), "mixup").beta(a, b, n)
    ref = np.random.default_rng(5).beta(a, b, n)

    def ks(x, y):
        grid = np.sort(np.concatenate([x, y]))
        fx = np.searchsorted(np.sort(x), grid, side="right") / len(x)
        fy = np.searchsorted(np.sort(y), grid, side="right") / len(y)
        return np.abs(fx - fy).max()

    assert ((ours > 0) & (ours < 1)).all()
    assert ks(ours, ref) < 0.016
    assert abs(ours.mean() - a / (a + b)) < 0.01
    if a == b == 10.0:  # the control: a slightly wider Beta is told apart
        assert ks(ours, np.random.default_rng(6).beta(8.0, 8.0, n)) > 0.02


def test_finetune_block_draws_equal_the_samples_drawn_one_by_one():
    """Each sample's finetuning draws are the same in any block; the masks lie inside the image
    and within the maximum widths; the roll within [-T, T)."""
    aug = AugmentConfig()
    block = augment.draw_finetune_block(3, 1, range(40, 140), aug, 57, 512, 128)
    for k in (0, 37, 99):
        one = augment.draw_finetune_block(3, 1, [40 + k], aug, 57, 512, 128)
        for name in ("mix", "partner", "lam", "masks", "roll"):
            assert np.array_equal(getattr(one, name)[0], getattr(block, name)[k]), name
    t0, t1, f0, f1 = block.masks.T
    assert (0 <= t0).all() and (t1 <= 512).all() and (t1 - t0 <= aug.ft_timem).all()
    assert (0 <= f0).all() and (f1 <= 128).all() and (f1 - f0 <= aug.ft_freqm).all()
    assert (block.roll >= -512).all() and (block.roll < 512).all()
    assert (block.partner >= 0).all() and (block.partner < 57).all()
    assert len(set(block.partner.tolist())) > 40
