"""Tests of the synthetic dataset generator: real media decoded by PyAV/soundfile/PIL, dataset files
read back with ``equiav.data.index``, determinism, and a measurable class signal."""

from __future__ import annotations

import colorsys
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from equiav.data import index, synth

SECONDS = 3
CLIPS = 6
CLASSES = 3


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthInfo:
    """The reference dataset: all formats, multi-label, two worker processes."""
    out = tmp_path_factory.mktemp("synth_a")
    return synth.generate(out, CLIPS, CLASSES, seed=0, seconds=SECONDS, workers=2)


@pytest.fixture(scope="module")
def ds_again(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthInfo:
    """Same arguments as ``ds`` but rendered in this process (workers=1), into another folder."""
    out = tmp_path_factory.mktemp("synth_b")
    return synth.generate(out, CLIPS, CLASSES, seed=0, seconds=SECONDS, workers=1)


def decode_video(path: Path) -> tuple[list[Fraction], list[np.ndarray], av.VideoStream]:
    """All frames of a video file as (timestamps in seconds, RGB arrays)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        times, images = [], []
        for f in c.decode(stream):
            times.append(f.pts * f.time_base)
            images.append(f.to_ndarray(format="rgb24"))
        return times, images, stream


def read_jpeg(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_dataset_files(ds: synth.SynthInfo) -> None:
    root = ds.root
    expected = {f"{s}{suffix}.json" for s in synth.SPLITS for suffix in ("", "_webm", "_mp4")}
    assert {p.name for p in root.glob("*.json")} == expected
    assert ds.num_train + ds.num_test == CLIPS and ds.num_test == round(CLIPS * 0.3)
    labels = index.read_label_csv(ds.label_csv)
    assert labels.mids == tuple(f"/m/syn{c:03d}" for c in range(CLASSES))
    assert len(set(labels.names)) == CLASSES
    ids = [f"syn0_{i:06d}" for i in range(CLIPS)]
    for split, want in [
        ("train", ids[: ds.num_train]),
        ("test", ids[ds.num_train :]),
        ("retrieval", ids[ds.num_train :]),
    ]:
        for fmt in ("frames", "webm", "mp4"):
            path = ds.dataset(split, fmt)
            doc = json.loads(path.read_text())
            for item in doc["data"]:  # paths are relative to the JSON's folder
                assert not Path(item["wav"]).is_absolute()
                assert not Path(item["video_path"]).is_absolute()
            entries = index.read_dataset(path)
            assert [e.video_id for e in entries] == want
            for i, e in zip((ids.index(v) for v in want), entries, strict=True):
                assert Path(e.wav) == root / "wav" / f"{e.video_id}.wav"
                assert set(e.labels) <= set(labels.mids)
                assert e.labels == tuple(
                    labels.mids[c] for c in synth.draw_labels(0, i, CLASSES, True)
                )
                if fmt == "frames":
                    assert not e.is_video_file and Path(e.video_path) == root / "frames"
                    for k in range(SECONDS):
                        assert Path(e.frame_path(k)).is_file()
                    assert not Path(e.frame_path(SECONDS)).exists()
                else:
                    assert e.is_video_file and Path(e.video_path).is_file()
                    assert e.video_path.endswith(f".{fmt}")


def test_media_formats(ds: synth.SynthInfo) -> None:
    for e in index.read_dataset(ds.dataset("train", "webm")) + index.read_dataset(
        ds.dataset("test", "mp4")
    ):
        info = sf.info(e.wav)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == 16000 * SECONDS
        wav, _ = sf.read(e.wav, dtype="int16")
        assert wav.dtype == np.int16 and np.abs(wav).max() > 1000  # not silent
        times, images, stream = decode_video(Path(e.video_path))
        assert stream.codec_context.name == ("vp9" if e.video_path.endswith("webm") else "h264")
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (320, 240)
        assert stream.average_rate == 25
        assert len(images) == 25 * SECONDS and images[0].shape == (240, 320, 3)
        assert times == [Fraction(i, 25) for i in range(25 * SECONDS)]


def test_keyframes_every_two_seconds(tmp_path: Path) -> None:
    info = synth.generate(tmp_path, 1, 2, seed=3, seconds=7, video_format="webm,mp4", workers=1)
    assert not (tmp_path / "train.json").exists() and not (tmp_path / "frames").exists()
    for fmt in ("webm", "mp4"):
        (entry,) = index.read_dataset(info.dataset("train", fmt))
        with av.open(entry.video_path) as c:
            stream = c.streams.video[0]
            packets = [p for p in c.demux(stream) if p.size > 0]
        keys = sorted(float(p.pts * p.time_base) for p in packets if p.is_keyframe)
        assert len(packets) == 25 * 7
        assert keys == [0.0, 2.0, 4.0, 6.0], fmt


def test_frames_match_video(ds: synth.SynthInfo) -> None:
    """frame_k is the frame on screen at k + 0.5 s in both video files."""
    for fmt in ("webm", "mp4"):
        for e in index.read_dataset(ds.dataset("train", fmt)):
            times, images, _ = decode_video(Path(e.video_path))
            jpegs = [read_jpeg(index.frame_path(str(ds.root / "frames"), e.video_id, k))
                     for k in range(SECONDS)]  # fmt: skip
            for k, jpeg in enumerate(jpegs):
                on_screen = max(i for i, t in enumerate(times) if t <= Fraction(2 * k + 1, 2))
                assert on_screen == 25 * k + 12 == synth.frame_index(k)
                img = jpeg.astype(np.float64)
                mad = np.abs(img - images[on_screen]).mean()
                assert mad < 6.0, (e.video_id, fmt, k, mad)
                # The closest of the nearby frames (RMS, which weighs moving edges) is this one.
                near = range(max(0, on_screen - 2), min(len(images), on_screen + 3))
                rms = {i: np.sqrt(((img - images[i]) ** 2).mean()) for i in near}
                assert min(rms, key=rms.get) == on_screen, (e.video_id, fmt, k, rms)
                # A neighbouring second is clearly another picture.
                for other in (k - 1, k + 1):
                    if 0 <= other < SECONDS:
                        far = np.abs(img - images[synth.frame_index(other)]).mean()
                        assert far > 1.5 * mad, (e.video_id, fmt, k, other, far, mad)


def test_deterministic_and_worker_independent(
    ds: synth.SynthInfo, ds_again: synth.SynthInfo, tmp_path: Path
) -> None:
    text_files = [p.name for p in ds.root.glob("*.json")]
    text_files += ["class_labels_indices.csv", "weights.csv"]
    for name in text_files:
        assert (ds.root / name).read_bytes() == (ds_again.root / name).read_bytes(), name
    for a, b in zip(
        index.read_dataset(ds.dataset("train", "webm")) + index.read_dataset(ds.dataset("test")),
        index.read_dataset(ds_again.dataset("train", "webm"))
        + index.read_dataset(ds_again.dataset("test")),
        strict=True,
    ):
        assert np.array_equal(sf.read(a.wav, dtype="int16")[0], sf.read(b.wav, dtype="int16")[0])
        if a.is_video_file:
            frames_a, frames_b = (
                decode_video(Path(a.video_path))[1],
                decode_video(Path(b.video_path))[1],
            )
            assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b, strict=True))
            mp4 = a.video_path[: -len("webm")] + "mp4"
            mp4_b = b.video_path[: -len("webm")] + "mp4"
            assert all(
                np.array_equal(x, y)
                for x, y in zip(
                    decode_video(Path(mp4))[1], decode_video(Path(mp4_b))[1], strict=True
                )
            )
        else:
            for k in range(SECONDS):
                assert Path(a.frame_path(k)).read_bytes() == Path(b.frame_path(k)).read_bytes()

    other = synth.generate(tmp_path, CLIPS, CLASSES, seed=1, seconds=SECONDS,
                           video_format="frames", workers=1)  # fmt: skip
    assert other.dataset("train").read_bytes() != ds.dataset("train").read_bytes()
    for a, b in zip(
        index.read_dataset(ds.dataset("train")),
        index.read_dataset(other.dataset("train")),
        strict=True,
    ):
        assert a.video_id.startswith("syn0_") and b.video_id.startswith("syn1_")
        assert not np.array_equal(sf.read(a.wav)[0], sf.read(b.wav)[0])
        assert not np.array_equal(read_jpeg(a.frame_path(1)), read_jpeg(b.frame_path(1)))


def test_label_counts() -> None:
    multi = [synth.draw_labels(0, i, 10, True) for i in range(600)]
    single = [synth.draw_labels(0, i, 10, False) for i in range(600)]
    assert all(len(set(ls)) == len(ls) and list(ls) == sorted(ls) for ls in multi)
    sizes = Counter(len(ls) for ls in multi)
    assert set(sizes) == {1, 2, 3}
    assert 0.4 < sizes[1] / 600 < 0.6 and 0.08 < sizes[3] / 600 < 0.22
    assert all(len(ls) == 1 for ls in single)
    assert set(c for (c,) in single) == set(range(10))
    # With two classes multi-label clips hold at most both.
    assert max(len(synth.draw_labels(0, i, 2, True)) for i in range(50)) == 2


def test_single_label_webm_only(tmp_path: Path) -> None:
    info = synth.generate(tmp_path, 5, 4, seed=2, multi_label=False, video_format="webm",
                          seconds=1, workers=1)  # fmt: skip
    assert {p.name for p in tmp_path.glob("*.json")} == {
        "train_webm.json",
        "test_webm.json",
        "retrieval_webm.json",
    }
    assert not (tmp_path / "frames").exists() and not list((tmp_path / "video").glob("*.mp4"))
    with pytest.raises(KeyError):
        info.dataset("train", "frames")
    entries = index.read_dataset(info.dataset("train", "webm"))
    entries += index.read_dataset(info.dataset("test", "webm"))
    assert len(entries) == 5 and all(len(e.labels) == 1 for e in entries)


def test_weights_formula(ds: synth.SynthInfo) -> None:
    train = index.read_dataset(ds.dataset("train"))
    counts = Counter(m for e in train for m in e.labels)
    want = [sum(1000.0 / (counts[m] + 0.01) for m in e.labels) for e in train]
    got = np.loadtxt(ds.weights_csv, ndmin=1)
    assert len(got) == len(train)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_class_signal(tmp_path: Path) -> None:
    """Each class's chord partials and hue stand out in its own clips, against the other class."""
    info = synth.generate(tmp_path, 12, 2, seed=5, multi_label=False, video_format="frames",
                          seconds=2, workers=1)  # fmt: skip
    entries = index.read_dataset(info.dataset("train")) + index.read_dataset(info.dataset("test"))
    specs = synth.class_specs(2)
    by_class = {s.mid: [e for e in entries if e.labels == (s.mid,)] for s in specs}
    assert all(len(v) >= 3 for v in by_class.values()), {m: len(v) for m, v in by_class.items()}

    def tone_share(wav_path: str, spec: synth.ClassSpec) -> float:
        """Share of the spectrum's power within +-3 % of the class's chord notes."""
        x, rate = sf.read(wav_path)
        power = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / rate)
        notes = [spec.root_hz * r for r in synth.CHORDS[spec.chord]]
        near = np.zeros_like(freqs, dtype=bool)
        for f in notes:
            near |= np.abs(freqs - f) < 0.03 * f
        return power[near].sum() / power.sum()

    def hue_share(jpeg_path: str, spec: synth.ClassSpec) -> float:
        """Share of saturated, bright pixels whose hue is within 0.04 of the class hue."""
        rgb = read_jpeg(jpeg_path).reshape(-1, 3) / 255.0
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in rgb[::7]])
        vivid = (hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.4)
        dist = np.abs((hsv[:, 0] - spec.hue + 0.5) % 1.0 - 0.5)
        return float(np.mean(vivid & (dist < 0.04)))

    for spec, other in [(specs[0], specs[1]), (specs[1], specs[0])]:
        own = [tone_share(e.wav, spec) for e in by_class[spec.mid]]
        rest = [tone_share(e.wav, spec) for e in by_class[other.mid]]
        assert np.mean(own) > 2 * np.mean(rest), (spec.mid, own, rest)
        own = [hue_share(e.frame_path(k), spec) for e in by_class[spec.mid] for k in (0, 1)]
        rest = [hue_share(e.frame_path(k), spec) for e in by_class[other.mid] for k in (0, 1)]
        assert np.mean(own) > 3 * np.mean(rest) + 0.002, (spec.mid, own, rest)


def test_in_view_keeps_class_objects_in_the_centre_square(tmp_path: Path) -> None:
    """With in_view the class objects never leave the square the clean view's centre crop shows
    (by default they do in some frames); the audio is unchanged."""

    def vivid_columns(root: Path, video_id: str, k: int) -> np.ndarray:
        rgb = read_jpeg(str(root / "frames" / f"frame_{k}" / f"{video_id}.jpg")) / 255.0
        spread = rgb.max(axis=2) - rgb.min(axis=2)  # saturation x value: the backdrop is dull
        return np.nonzero((spread > 0.35).any(axis=0))[0]

    clips, seconds = 8, 4
    kwargs = dict(multi_label=False, video_format="frames", seconds=seconds, workers=1, noise=0.0)
    wrap = synth.generate(tmp_path / "wrap", clips, 4, seed=7, **kwargs)
    view = synth.generate(tmp_path / "view", clips, 4, seed=7, in_view=True, **kwargs)
    lo = (synth.WIDTH - synth.HEIGHT) // 2
    outside = {"wrap": 0, "view": 0}
    for info, name in ((wrap, "wrap"), (view, "view")):
        for entry in index.read_dataset(info.dataset("train")):
            for k in range(seconds):
                cols = vivid_columns(info.root, entry.video_id, k)
                outside[name] += int(np.sum((cols < lo - 2) | (cols > lo + synth.HEIGHT + 1)))
            if name == "view":
                a, _ = sf.read(str(view.root / "wav" / f"{entry.video_id}.wav"))
                b, _ = sf.read(str(wrap.root / "wav" / f"{entry.video_id}.wav"))
                assert np.array_equal(a, b), entry.video_id
    assert outside["view"] == 0, outside
    assert outside["wrap"] > 0, outside


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="video_format"):
        synth.generate(tmp_path, 2, 2, seed=0, video_format="avi")
    with pytest.raises(ValueError, match="noise"):
        synth.generate(tmp_path, 2, 2, seed=0, noise=-1)
    with pytest.raises(ValueError, match="classes"):
        synth.generate(tmp_path, 2, 0, seed=0)


def test_command_line(tmp_path: Path) -> None:
    synth.main(["--out", str(tmp_path), "--clips", "3", "--classes", "2", "--seed", "4",
                "--single-label", "--video-format", "frames", "--seconds", "1",
                "--workers", "1", "--test-fraction", "0.34", "--noise", "0"])  # fmt: skip
    assert {p.name for p in tmp_path.glob("*.json")} == {
        "train.json",
        "test.json",
        "retrieval.json",
    }
    train = index.read_dataset(tmp_path / "train.json")
    assert [e.video_id for e in train] == ["syn4_000000", "syn4_000001"]
    assert all(len(e.labels) == 1 for e in train)
    assert Path(train[0].frame_path(0)).is_file() and not Path(train[0].frame_path(1)).exists()
