"""The WebM scanner against FFmpeg's Matroska demuxer (PyAV) on real files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from dali_pipelines import video
from equiav.data import matroska, mp4, synth


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The synthetic clip (VP9 webm, H.264 mp4), and a VP9 + Opus webm with a 1/30 s video time
    base, a late first frame and uneven frame gaps (audio blocks interleaved)."""
    root = tmp_path_factory.mktemp("mkv")
    synth.generate(root, clips=1, classes=2, seed=0, video_format="webm,mp4", seconds=6.0)
    path = str(root / "av.webm")
    rng = np.random.default_rng(2)
    with av.open(path, "w") as container:
        vs = container.add_stream(
            "libvpx-vp9", rate=30, options={"deadline": "realtime", "cpu-used": "8", "g": "20"}
        )
        vs.width, vs.height, vs.pix_fmt = 160, 96, "yuv420p"
        vs.codec_context.time_base = Fraction(1, 30)
        aus = container.add_stream("libopus", rate=48000)
        pts = np.cumsum(rng.integers(1, 4, 70)) + 5
        samples = 0
        for i, p in enumerate(pts.tolist()):
            img = rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = p
            container.mux(vs.encode(frame))
            if i % 2 == 0:
                tone = (0.1 * np.sin(np.arange(1920) / 7.0)).astype(np.float32)[None]
                audio = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
                audio.sample_rate, audio.pts = 48000, samples
                samples += 1920
                container.mux(aus.encode(audio))
        container.mux(vs.encode(None))
        container.mux(aus.encode(None))
    video_dir = root / "video"
    return {
        "webm": str(next(video_dir.glob("*.webm"))),
        "mp4": str(next(video_dir.glob("*.mp4"))),
        "av": path,
    }


def pyav_packets(path: str) -> tuple[av.video.stream.VideoStream, list[av.Packet]]:
    container = av.open(path)
    stream = container.streams.video[0]
    return stream, [p for p in container.demux(stream) if p.size]


@pytest.mark.parametrize("name", ["webm", "av"])
def test_scan_gives_what_ffmpeg_demuxes(files, name):
    """Codec, size, time base, every packet's timestamp, keyframe flag and bytes (found at the
    scanned span) as PyAV demuxes them; with an interleaved audio track too."""
    raw = open(files[name], "rb").read()
    found = matroska.scan(raw)
    stream, packets = pyav_packets(files[name])
    assert found is not None
    assert found.codec == stream.codec_context.codec.canonical_name == "vp9"
    assert found.size == (stream.codec_context.height, stream.codec_context.width)
    assert found.time_base == stream.time_base
    assert found.pts == [p.pts for p in packets]
    assert found.keyframes == [p.is_keyframe for p in packets]
    assert sum(found.keyframes) > 1 and not all(found.keyframes)
    for (offset, size), packet in zip(found.spans, packets, strict=True):
        assert raw[offset : offset + size] == bytes(packet)
    if name == "av":
        assert len(av.open(files[name]).streams.audio) == 1  # the audio blocks were skipped


def test_scan_leaves_other_files_to_ffmpeg(files):
    """MP4, garbage, a truncated file and a laced video block are not scanned (None)."""
    raw = open(files["webm"], "rb").read()
    found = matroska.scan(raw)
    assert matroska.scan(open(files["mp4"], "rb").read()) is None
    assert matroska.scan(b"\x1aE\xdf\xa3" + bytes(64)) is None
    assert matroska.scan(raw[: len(raw) // 2]) is None
    laced = bytearray(raw)
    laced[found.spans[3][0] - 1] |= 0x02  # the block's flags byte: Xiph lacing
    assert matroska.scan(bytes(laced)) is None
    assert matroska.scan(raw) is not None  # the control: the same bytes unchanged


def assert_probes_agree(path: str, excerpted: bool, monkeypatch) -> None:
    """The loader's probe of ``path`` (frame times, size, excerpt packets where ``excerpted``)
    is the same whether the scanners or PyAV read the file."""
    raw = Path(path).read_bytes()
    scanned = video._probe_bytes(path, raw)
    monkeypatch.setattr(matroska, "scan", lambda raw: None)
    monkeypatch.setattr(mp4, "scan", lambda raw: None)
    demuxed = video._probe_bytes(path, raw)
    assert scanned.codec == demuxed.codec and scanned.size == demuxed.size
    assert np.array_equal(scanned.times, demuxed.times)
    for a, b in [(scanned.packets, demuxed.packets), (scanned.keyframes, demuxed.keyframes)]:
        assert (a is None) == (b is None) == (not excerpted)
        assert a is None or np.array_equal(a, b)


@pytest.mark.parametrize("name", ["webm", "av", "mp4"])
def test_probe_is_the_same_with_or_without_the_scanner(files, name, monkeypatch):
    """The H.264 mp4 is not excerpted; tests/test_mp4.py has more MP4s."""
    assert_probes_agree(files[name], name != "mp4", monkeypatch)


def test_probe_cache_uses_the_callers_bytes_and_keeps_the_most_recent(files, monkeypatch):
    """A probe on a cache miss reads nothing when the caller hands it the file's bytes (the
    source read them already), rereads when they are not the file's size, and the cache keeps
    the PROBE_CACHE_SIZE most recently used files."""
    video.clear_probe_cache()
    reads = []
    store = video.store()
    original = store.read

    def counting_read(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(store, "read", counting_read)
    data = np.frombuffer(Path(files["webm"]).read_bytes(), np.uint8)
    first = video._probe(files["webm"], data)
    assert reads == [] and video._probe(files["webm"]) is first  # then served by the cache
    video.clear_probe_cache()
    video._probe(files["webm"], data[:-1])  # not the file's bytes: read again
    assert reads == [files["webm"]]
    monkeypatch.setattr(video, "PROBE_CACHE_SIZE", 2)
    video.clear_probe_cache()
    for name in ("webm", "av", "webm", "mp4"):  # av is the least recently used at the end
        video._probe(files[name])
    assert [key[0] for key in video._probes] == [files["webm"], files["mp4"]]
