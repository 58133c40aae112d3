"""Tests of ``equiav.data.prepare`` on real media files made here with PyAV.

The videos cover the containers and codecs users bring (VP9 + Opus in WebM, H.264 + AAC in MP4,
MJPEG + PCM in Matroska; stereo audio at 44.1 / 48 kHz), plus the failures a folder of downloads
holds (no audio stream, a file cut short in two ways, a CSV row without a file). Outputs are checked
against independent references: the wav against the tones that were encoded (and, for lossless PCM,
against torchaudio's resampler), each frame against the video's own decoded frame at k + 0.5 s.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from dali_pipelines.video import frames_at_seconds
from equiav.data.index import compute_weights, read_dataset, read_label_csv, read_weights
from equiav.data.prepare import (
    Options,
    PrepareError,
    marker_path,
    prepare,
    read_label_rows,
    wav_path,
)

SECONDS = 4.0
TONES = (440.0, 1000.0)  # left, right channel
AMPLITUDE = 0.3
YTID = "-_aB3cD4eF5"  # AudioSet ids may start with '-' and hold underscores


def _picture(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: flat blocks whose levels change a lot from one frame to the next."""
    img = np.empty((height, width, 3), np.uint8)
    img[...] = (i * 37) % 200 + 30
    img[:, : width // 2, 0] = (i * 53) % 200 + 40
    img[: height // 2, :, 2] = (i * 71) % 200 + 20
    return img


def _tones(n: int, rate: int) -> np.ndarray:
    t = np.arange(n) / rate
    return np.stack([AMPLITUDE * np.sin(2 * np.pi * f * t) for f in TONES]).astype(np.float32)


def make_video(
    path: Path,
    vcodec: str,
    fps: int,
    size: tuple[int, int],
    acodec: str | None = None,
    arate: int = 44100,
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
) -> Path:
    """A SECONDS long video of ``_picture`` frames with a stereo ``_tones`` track (if acodec)."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream(vcodec, rate=fps, options=options or {})
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], pix_fmt
        a = c.add_stream(acodec, rate=arate, layout="stereo") if acodec else None
        for i in range(int(SECONDS * fps)):
            frame = av.VideoFrame.from_ndarray(_picture(i, *size), format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        if a is not None:
            x = _tones(int(SECONDS * arate), arate)
            step = a.codec_context.frame_size or 1024
            planar = a.codec_context.format.is_planar
            for s in range(0, x.shape[1], step):
                chunk = np.ascontiguousarray(x[:, s : s + step])
                if planar:
                    af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                else:
                    packed = np.ascontiguousarray(chunk.T.reshape(1, -1))
                    af = av.AudioFrame.from_ndarray(packed, format="flt", layout="stereo")
                af.sample_rate, af.pts = arate, s
                c.mux(a.encode(af))
            c.mux(a.encode(None))
    return path


def cut_file(src: Path, dst: Path, fraction: float) -> Path:
    """The first ``fraction`` of a file's bytes: a download that stopped part-way."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def decoded_frames(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every frame of a video as RGB arrays and their times relative to the first frame."""
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    t0 = frames[0].pts
    times = np.array([float((f.pts - t0) * f.time_base) for f in frames])
    return [f.to_ndarray(format="rgb24") for f in frames], times


def decoded_audio(path: Path) -> tuple[np.ndarray, int]:
    """The audio stream as float (channels, samples) and its rate."""
    resampler = av.AudioResampler(format="fltp")
    with av.open(str(path)) as c:
        chunks, rate = [], 0
        for f in c.decode(audio=0):
            rate = f.sample_rate
            chunks += [g.to_ndarray() for g in resampler.resample(f)]
    chunks += [g.to_ndarray() for g in resampler.resample(None)]
    return np.concatenate(chunks, axis=1), rate


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    vp9 = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    v = {
        "vp9": make_video(d / f"{YTID}_30_40.webm", "libvpx-vp9", 10, (176, 144), "libopus",
                          48000, options=vp9),
        "h264": make_video(d / "h264clip001.mp4", "libx264", 7, (320, 240), "aac", 44100),
        "mjpeg": make_video(d / "mjpegclip01.mkv", "mjpeg", 15, (160, 120), "pcm_s16le", 44100,
                            pix_fmt="yuvj420p"),
        "silent": make_video(d / "silentclip1.mp4", "libx264", 10, (160, 120)),
    }  # fmt: skip
    v["cut"] = cut_file(v["vp9"], d / "cutclip0001.webm", 0.5)
    v["stub"] = cut_file(v["vp9"], d / "stubclip001.webm", 0.05)
    v["broken"] = cut_file(v["h264"], d / "brokenclip1.mp4", 0.5)  # its index (moov) is at the end
    shutil.copy(v["mjpeg"], d / "notincsv001.mkv")
    return v


AUDIOSET_ROWS = [
    (YTID, "/m/a,/m/b"),
    ("h264clip001", "/m/b"),
    ("mjpegclip01", "/m/c"),
    ("silentclip1", "/m/a"),
    ("cutclip0001", "/m/a,/m/c"),
    ("stubclip001", "/m/a"),
    ("brokenclip1", "/m/b"),
    ("missingclip", "/m/c"),
]


def write_audioset_csv(path: Path, rows) -> Path:
    lines = [
        "# Segments csv created Sun Mar  5 10:54:31 2017",
        f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels=3, "
        "num_positive_labels=11",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    lines += [f'{ytid}, 30.000, 40.000, "{labels}"' for ytid, labels in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def audioset_run(videos, tmp_path_factory):
    """One run over the folder with an AudioSet CSV, full-size frames, two worker processes."""
    d = tmp_path_factory.mktemp("audioset")
    labels = write_audioset_csv(d / "segments.csv", AUDIOSET_ROWS)
    options = Options(seconds=SECONDS, max_short_side=0, center_crop=False)
    out = d / "out"
    report = prepare(videos["vp9"].parent, labels, out, options=options, workers=2, progress=False)
    return report, out, labels, options


def test_report_names_every_failure_and_json_leaves_them_out(audioset_run, videos):
    report, out, _, _ = audioset_run
    doc = json.loads((out / "prepare_report.json").read_text())
    kinds = {f["video_id"]: f["kind"] for f in doc["failures"]}
    assert kinds == {
        "silentclip1": "no_audio",
        "stubclip001": "too_short",
        "brokenclip1": "unreadable",
        "missingclip": "missing_video",
    }
    paths = {f["video_id"]: f["path"] for f in doc["failures"]}
    assert paths["silentclip1"] == str(videos["silent"])
    assert doc["counts"]["prepared"] == 4 and doc["counts"]["failed"] == 4
    assert doc["unlisted"] == [str(videos["vp9"].parent / "notincsv001.mkv")]
    warned = {(w["video_id"], w["kind"]) for w in doc["warnings"]}
    assert warned == {("cutclip0001", "short_audio"), ("cutclip0001", "short_video")}
    summary = "\n".join(report.summary_lines())
    for kind in ("no_audio", "too_short", "unreadable", "missing_video", "short_video"):
        assert kind in summary

    entries = read_dataset(out / "data.json")
    assert [e.video_id for e in entries] == [
        f"{YTID}_30_40", "h264clip001", "mjpegclip01", "cutclip0001"
    ]  # fmt: skip
    assert [e.labels for e in entries] == [("/m/a", "/m/b"), ("/m/b",), ("/m/c",), ("/m/a", "/m/c")]
    assert all(e.video_path == str(out / "frames") for e in entries)
    vocab = read_label_csv(out / "class_labels_indices.csv")
    assert vocab.mids == ("/m/a", "/m/b", "/m/c")
    weights = read_weights(out / "weights.csv", expected=len(entries))
    np.testing.assert_allclose(weights, compute_weights([e.labels for e in entries]))
    # Nothing half-written is left behind.
    assert not [p for p in out.rglob(".*.tmp")]


def test_wavs_are_16k_mono_int16_of_the_tones(audioset_run, videos):
    _, out, _, _ = audioset_run
    n = int(SECONDS * 16000)
    t = np.arange(n) / 16000
    mono = np.mean([AMPLITUDE * np.sin(2 * np.pi * f * t) for f in TONES], axis=0)
    for name, vid, min_snr in (("vp9", f"{YTID}_30_40", 30.0), ("h264", "h264clip001", 20.0)):
        x, rate = sf.read(wav_path(out, vid), dtype="int16", always_2d=True)
        assert rate == 16000 and x.shape == (n, 1), name
        err = x[:, 0] / 32767.0 - mono
        snr = 10 * np.log10(np.mean(mono**2) / np.mean(err**2))
        assert snr > min_snr, (name, snr)  # a lossy codec, no delay, no aliasing, no gain change

    # Lossless PCM at 44.1 kHz: exactly the channel mean resampled by torchaudio, then rounded.
    x, rate = sf.read(wav_path(out, "mjpegclip01"), dtype="int16")
    pcm, pcm_rate = decoded_audio(videos["mjpeg"])
    assert pcm_rate == 44100 and pcm.shape[0] == 2
    ref = torchaudio.functional.resample(torch.from_numpy(pcm.mean(0)), 44100, 16000).numpy()
    ref = np.clip(np.round(ref[:n] * 32767), -32768, 32767)
    assert x.shape == (n,)
    assert np.abs(x - ref).max() <= 1

    # The cut file keeps what decodes, unpadded.
    cut, cut_rate = decoded_audio(videos["cut"])
    x, _ = sf.read(wav_path(out, "cutclip0001"), dtype="int16")
    assert len(x) == math.ceil(cut.shape[1] * 16000 / cut_rate)
    assert 1.0 < len(x) / 16000 < SECONDS - 0.5


@pytest.mark.parametrize("name", ["vp9", "h264", "mjpeg", "cut"])
def test_frame_k_is_the_video_frame_at_k_plus_half_second(audioset_run, videos, name):
    _, out, _, _ = audioset_run
    path = videos[name]
    frames, times = decoded_frames(path)
    fps = {"vp9": 10, "h264": 7, "mjpeg": 15, "cut": 10}[name]
    for k in range(int(SECONDS)):
        # Independent of the code under test: frame floor((k + 0.5) * fps), or the last one.
        expect = min(int(math.floor((k + 0.5) * fps + 1e-9)), len(frames) - 1)
        if name != "cut":
            assert frames_at_seconds(path, [k + 0.5]) == [expect]  # the video-file path agrees
            assert abs(times[expect] - expect / fps) < 2e-3
        jpg = np.asarray(Image.open(out / "frames" / f"frame_{k}" / f"{path.stem}.jpg"))
        assert jpg.shape == frames[expect].shape
        assert mean_abs(jpg, frames[expect]) < 2.5, (name, k)
        # ... and clearly not a neighbouring frame.
        for other in (expect - 1, expect + 1):
            if 0 <= other < len(frames):
                assert mean_abs(jpg, frames[other]) > 10.0, (name, k, other)
    assert not (out / "frames" / "frame_4").exists()  # k + 0.5 must lie inside the 4 s clip


def test_path_csv_vocabulary_names_and_default_frame_size(videos, tmp_path):
    """``path,labels`` CSV without a video folder; labels by id or by a display name holding a
    comma; default frames: shorter side 224 (never enlarged), centre square, as CAV-MAE's."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("h264", "mjpeg", "vp9"):
        shutil.copy(videos[name], clips / videos[name].name)
    vocab = tmp_path / "class_labels_indices.csv"
    vocab.write_text(
        'index,mid,display_name\n0,/m/a,"Dog"\n1,/m/b,"Cat, domestic"\n2,/m/c,"Bird"\n'
    )
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerow(["clips/h264clip001.mp4", "Cat, domestic"])
        w.writerow(["clips/mjpegclip01.mkv", "/m/a,Bird"])
        w.writerow([f"clips/{videos['vp9'].name}", "/m/zzz"])
        w.writerow(["clips/nothere.mp4", "/m/a"])
    out = tmp_path / "out"
    report = prepare(None, labels, out, label_csv=vocab, options=Options(seconds=SECONDS),
                     workers=1, progress=False)  # fmt: skip
    kinds = {r.video_id: (r.status, r.kind) for r in report.results}
    assert kinds == {
        "h264clip001": ("prepared", None),
        "mjpegclip01": ("prepared", None),
        f"{YTID}_30_40": ("failed", "unknown_label"),
        "nothere": ("failed", "missing_video"),
    }
    entries = read_dataset(out / "data.json")
    assert [(e.video_id, e.labels) for e in entries] == [
        ("h264clip001", ("/m/b",)),
        ("mjpegclip01", ("/m/a", "/m/c")),
    ]
    assert read_label_csv(out / "class_labels_indices.csv") == read_label_csv(vocab)

    frames, _ = decoded_frames(videos["h264"])
    ref = Image.fromarray(frames[int(2.5 * 7)]).resize((298, 224), Image.Resampling.BILINEAR)
    ref = np.asarray(ref.crop((37, 0, 37 + 224, 224)))  # torchvision's centre-crop offsets
    jpg = np.asarray(Image.open(out / "frames" / "frame_2" / "h264clip001.jpg"))
    assert jpg.shape == (224, 224, 3)
    assert mean_abs(jpg, ref) < 2.5
    small = Image.open(out / "frames" / "frame_0" / "mjpegclip01.jpg")
    assert small.size == (120, 120)  # 160x120: cropped, not enlarged


def test_resume_skips_done_clips_and_redoes_interrupted_ones(videos, tmp_path):
    rows = [("h264clip001", "/m/a"), ("mjpegclip01", "/m/b"), (YTID, "/m/a"),
            ("silentclip1", "/m/b")]  # fmt: skip
    labels = write_audioset_csv(tmp_path / "segments.csv", rows)
    out = tmp_path / "out"
    options = Options(seconds=SECONDS)

    def run() -> dict:
        prepare(videos["vp9"].parent, labels, out, options=options, workers=1, progress=False)
        return json.loads((out / "prepare_report.json").read_text())["counts"]

    first = run()
    assert (first["prepared"], first["skipped"], first["failed"]) == (3, 0, 1)
    second = run()
    assert (second["prepared"], second["skipped"], second["failed"]) == (0, 3, 1)

    # Interrupted while writing h264clip001's wav: only a partial temp file and no marker.
    wav = wav_path(out, "h264clip001")
    tmp = wav.with_name(f".{wav.name}.tmp")
    tmp.write_bytes(wav.read_bytes()[:1000])
    wav.unlink()
    marker_path(out, "h264clip001").unlink()
    # mjpegclip01 killed after writing its outputs, before its marker.
    marker_path(out, "mjpegclip01").unlink()
    third = run()
    assert (third["prepared"], third["skipped"], third["failed"]) == (2, 1, 1)
    x, rate = sf.read(wav, dtype="int16")
    assert rate == 16000 and len(x) == int(SECONDS * 16000)
    assert not tmp.exists()

    # A marker whose output has gone, and a changed option, are not done either.
    (out / "frames" / "frame_3" / "mjpegclip01.jpg").unlink()
    assert run()["prepared"] == 1
    options = Options(seconds=SECONDS, jpeg_quality=80)
    assert run()["prepared"] == 3
    assert len(read_dataset(out / "data.json")) == 3


def test_label_rows_formats_and_errors(tmp_path):
    audioset = write_audioset_csv(tmp_path / "a.csv", [("abc", "/m/x,/m/y"), ("d_e-f", "/m/z")])
    fmt, rows = read_label_rows(audioset)
    assert fmt == "audioset"
    assert [(r.key, r.labels, r.line) for r in rows] == [
        ("abc", "/m/x,/m/y", 4),
        ("d_e-f", "/m/z", 5),
    ]

    plain = tmp_path / "p.csv"
    plain.write_text("sub/v1.mp4,/m/x\n/abs/v2.webm,/m/x,/m/y\n")
    fmt, rows = read_label_rows(plain)
    assert fmt == "path"
    assert [(r.key, r.labels) for r in rows] == [("v1", "/m/x"), ("v2", "/m/x,/m/y")]
    assert rows[0].path == str((tmp_path / "sub" / "v1.mp4").resolve())

    mixed = tmp_path / "m.csv"
    mixed.write_text('abc, 0.0, 10.0, "/m/x"\nv.mp4,/m/x\n')
    with pytest.raises(PrepareError, match=r"m\.csv:2"):
        read_label_rows(mixed)
    empty = tmp_path / "e.csv"
    empty.write_text("# only comments\n")
    with pytest.raises(PrepareError, match=r"e\.csv: no label rows"):
        read_label_rows(empty)
    with pytest.raises(PrepareError, match="not found"):
        read_label_rows(tmp_path / "absent.csv")
