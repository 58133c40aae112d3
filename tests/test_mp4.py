"""The MP4/MOV scanner against FFmpeg's mov demuxer (PyAV) on real files."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from dali_pipelines import video
from equiav.data import mp4, synth
from tests.test_matroska import assert_probes_agree


def _write(path: Path, codec: str, container: dict, stream: dict, rng, audio=False, vfr=False):
    """60 frames of noise at 160 x 96 (30 fps time base); ``vfr``: uneven gaps and a late first
    frame (the muxer writes an empty edit); ``audio``: an AAC track before the video track."""
    with av.open(str(path), "w", **container) as out:
        sound = out.add_stream("aac", rate=48000) if audio else None
        vs = out.add_stream(codec, rate=30, options=stream)
        vs.width, vs.height = 160, 96
        vs.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        vs.codec_context.time_base = Fraction(1, 30)
        stamps = np.cumsum(rng.integers(1, 4, 60)) if vfr else np.arange(60)
        for i, pts in enumerate(stamps.tolist()):
            img = rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = pts
            out.mux(vs.encode(frame))
            if sound is not None and i % 2 == 0:
                tone = (0.1 * np.sin(np.arange(1024) / 7.0)).astype(np.float32)[None]
                chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 48000, 512 * i
                out.mux(sound.encode(chunk))
        out.mux(vs.encode(None))
        if sound is not None:
            out.mux(sound.encode(None))


VP9 = {"deadline": "realtime", "cpu-used": "8", "g": "20"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The synthetic clip's H.264 mp4 (B-frames, an edit list) and files PyAV writes: MPEG-4
    part 2 with the index first (faststart), VP9 with uneven frame gaps, a delayed start (an
    empty edit) and an audio track first, H.264 and MJPEG in QuickTime .mov, and a fragmented
    MP4."""
    root = tmp_path_factory.mktemp("mp4")
    synth.generate(root, clips=1, classes=2, seed=0, video_format="mp4", seconds=6.0)
    rng = np.random.default_rng(0)
    paths = {"synth": str(next((root / "video").glob("*.mp4")))}
    for name, codec, container, stream, extra in [
        ("mpeg4", "mpeg4", {"options": {"movflags": "faststart"}}, {}, {}),
        ("vp9", "libvpx-vp9", {"format": "mp4"}, VP9, {"audio": True, "vfr": True}),
        ("h264_mov", "libx264", {"format": "mov"}, {"bf": "2", "g": "20"}, {}),
        ("mjpeg_mov", "mjpeg", {"format": "mov"}, {}, {}),
        ("fragmented", "mpeg4", {"options": {"movflags": "frag_keyframe+empty_moov"}}, {}, {}),
    ]:
        path = root / f"{name}.{'mov' if name.endswith('mov') else 'mp4'}"
        _write(path, codec, container, stream, rng, **extra)
        paths[name] = str(path)
    return paths


SCANNED = ["synth", "mpeg4", "vp9", "h264_mov", "mjpeg_mov"]


@pytest.mark.parametrize("name", SCANNED)
def test_scan_gives_what_ffmpeg_demuxes(files, name):
    """Codec, size, time base, every packet's timestamp (B-frames, edit lists, a delayed start
    included), keyframe flag and bytes (found at the scanned span), as PyAV demuxes them."""
    raw = Path(files[name]).read_bytes()
    found = mp4.scan(raw)
    assert found is not None
    with av.open(files[name]) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        assert found.codec == stream.codec_context.codec.canonical_name
        assert found.size == (stream.codec_context.height, stream.codec_context.width)
        assert found.time_base == stream.time_base
        assert found.pts == [p.pts for p in packets]
        assert found.keyframes == [p.is_keyframe for p in packets]
        for (offset, size), packet in zip(found.spans, packets, strict=True):
            assert raw[offset : offset + size] == bytes(packet)
    if name == "synth":  # the cases the fixture is there for
        assert found.pts != sorted(found.pts)  # B-frames: presentation order differs
    if name == "vp9":
        assert found.pts[0] > 0 and 1 < sum(found.keyframes) < len(found.keyframes)


def test_scan_leaves_other_files_to_ffmpeg(files):
    """Fragmented MP4, WebM, garbage, a truncated file and an edit at another rate are not
    scanned (None); the probe still answers for a fragmented file through PyAV."""
    raw = Path(files["mpeg4"]).read_bytes()
    assert mp4.scan(raw) is not None  # the control
    assert mp4.scan(Path(files["fragmented"]).read_bytes()) is None
    assert mp4.scan(b"\x1aE\xdf\xa3" + bytes(64)) is None  # Matroska's magic
    assert mp4.scan(bytes(4) + b"ftyp" + bytes(8)) is None  # a box of size 0 < its header
    assert mp4.scan(raw[: len(raw) // 3]) is None  # faststart: the index, cut short
    synth_raw = Path(files["synth"]).read_bytes()
    at = synth_raw.index(b"elst") + 4  # version 0: flags, count, then duration, time, rate
    assert synth_raw[at] == 0 and int.from_bytes(synth_raw[at + 4 : at + 8], "big") == 1
    rate = at + 16
    assert int.from_bytes(synth_raw[rate : rate + 2], "big") == 1
    faster = synth_raw[:rate] + (2).to_bytes(2, "big") + synth_raw[rate + 2 :]
    assert mp4.scan(faster) is None  # an edit played at twice the rate
    times = video._probe_bytes(files["fragmented"], Path(files["fragmented"]).read_bytes()).times
    assert len(times) == 60


@pytest.mark.parametrize("name", [*SCANNED, "fragmented"])
def test_probe_is_the_same_with_or_without_the_scanner(files, name, monkeypatch):
    """Frame times, size and, for VP9, the excerpt packets."""
    assert_probes_agree(files[name], name == "vp9", monkeypatch)


def test_vp9_mp4_excerpt_decodes_the_same_frames(files):
    """An excerpt cut from the scanned spans of a VP9 mp4 decodes, at the positions it returns,
    the frames the whole file decodes at the original indices."""
    path = files["vp9"]
    data = np.fromfile(path, dtype=np.uint8)
    with av.open(path) as container:
        whole = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    wanted = [45, 3, 21]
    excerpt, positions = video.video_excerpt(path, data, wanted)
    assert bytes(excerpt[:4]) == b"DKIF" and len(excerpt) < len(data)
    with av.open(io.BytesIO(excerpt.tobytes()), format="ivf") as container:
        cut = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for frame, position in zip(wanted, positions, strict=True):
        assert np.array_equal(cut[position], whole[frame]), (frame, position)
    assert not np.array_equal(cut[positions[0] - 1], whole[wanted[0]])  # the control
