"""Video decode stages: DALI frames against independent PyAV/PIL/torchvision references.

Media: one synthetic clip from ``equiav.data.synth`` (VP9 webm, H.264 mp4 with B-frames, JPEG
frames layout; 320x240, 25 fps, 10 s) and a small variable-frame-rate portrait webm made here
(30 fps nominal, first frame at 0.233 s, a 1 s gap).

The decoded-frame reference converts the decoder's own YUV planes (PyAV) to RGB in this file:
BT.601 limited range with bilinear, centre-sited chroma upsampling, which is what DALI's CPU
decoder does (MEASURED.md). PyAV's rgb24 conversion upsamples chroma differently (3-4/255 off at
colour edges), so it is not the reference.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image

from dali_pipelines import frame as frame_cli
from dali_pipelines.video import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VideoCodecError,
    check_decodable,
    clean_view,
    decode_jpeg,
    decode_video_frame,
    decode_video_frames,
    frame_index_at,
    frames_at_seconds,
    video_codec,
    video_excerpt,
    video_frame_times,
)
from equiav.data import synth
from equiav.data.index import frame_path

CLIP_SECONDS = range(10)

# ----------------------------------------------------------------------------------------------
# Media fixtures


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """One synthetic clip in all three layouts: dict with webm, mp4, frames, video_id."""
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, clips=1, classes=2, seed=0, video_format="all", seconds=10.0, workers=1)
    video_id = "syn0_000000"
    return {
        "webm": str(root / "video" / f"{video_id}.webm"),
        "mp4": str(root / "video" / f"{video_id}.mp4"),
        "frames": str(root / "frames"),
        "video_id": video_id,
    }


VFR_PTS = list(range(7, 67)) + list(range(97, 187))  # in 1/30 s: 60 frames, a 1 s gap, 90 frames


@pytest.fixture(scope="module")
def vfr_webm(tmp_path_factory):
    """Portrait 240x320 VP9, 30 fps time base, first frame at 7/30 s, no frames in [2, 3) s."""
    path = str(tmp_path_factory.mktemp("vfr") / "vfr.webm")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:320, 0:240]
    with av.open(path, "w") as container:
        stream = container.add_stream(
            "libvpx-vp9", rate=30, options={"deadline": "realtime", "cpu-used": "8", "g": "50"}
        )
        stream.width, stream.height, stream.pix_fmt = 240, 320, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        for i, pts in enumerate(VFR_PTS):
            img = np.stack(
                [(xx + 5 * i) % 256, (yy * 2 + 3 * i) % 256, np.full_like(xx, (40 * i) % 256)], -1
            ).astype(np.uint8)
            img[(4 * i) % 280 : (4 * i) % 280 + 40, 60:140] = rng.integers(0, 256, 3)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# ----------------------------------------------------------------------------------------------
# References and a pipeline runner


def decoded_frames(path: str) -> list[av.VideoFrame]:
    """All frames decoded by PyAV, in presentation order (the decoder's output order)."""
    with av.open(path) as container:
        return list(container.decode(video=0))


def decoded_times(frames: list[av.VideoFrame]) -> np.ndarray:
    times = np.array([float(f.pts * f.time_base) for f in frames])
    return times - times[0]


def _upsample2(c: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Bilinear 2x upsampling along ``axis`` with chroma sited between two luma samples."""
    pos = np.clip(np.arange(n) / 2.0 - 0.25, 0, c.shape[axis] - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, c.shape[axis] - 1)
    w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(c.ndim)])
    return np.take(c, i0, axis) * (1 - w) + np.take(c, i1, axis) * w


def yuv_to_rgb_reference(frame: av.VideoFrame) -> np.ndarray:
    """RGB uint8 of a yuv420p frame: BT.601 limited range, bilinear centre-sited chroma."""
    h, w = frame.height, frame.width
    planes = frame.to_ndarray(format="yuv420p").astype(np.float64)
    y = planes[:h]
    u = planes[h : h + h // 4].reshape(h // 2, w // 2)
    v = planes[h + h // 4 :].reshape(h // 2, w // 2)
    u = _upsample2(_upsample2(u, h, 0), w, 1) - 128.0
    v = _upsample2(_upsample2(v, h, 0), w, 1) - 128.0
    y = (y - 16.0) * 255.0 / 219.0
    u, v = u * 255.0 / 224.0, v * 255.0 / 224.0
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def torchvision_clean_view(img: np.ndarray) -> np.ndarray:
    """The original code's clean view on a PIL image."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return tf(Image.fromarray(img)).numpy()


def run_dali(graph, columns, layouts=None, gpu: bool = False) -> list[list[np.ndarray]]:
    """Run ``graph(*nodes)`` once over one batch; ``columns`` are lists of per-sample arrays."""
    batch = len(columns[0])

    @pipeline_def(batch_size=batch, num_threads=1, device_id=0 if gpu else None)
    def pipe():
        nodes = fn.external_source(
            source=lambda: tuple(columns), num_outputs=len(columns), layout=layouts
        )
        out = graph(*nodes)
        return tuple(out) if isinstance(out, (tuple, list)) else out

    p = pipe()
    p.build()
    outs = p.run()
    return [[np.array(o.as_cpu()[i] if gpu else o[i]) for i in range(batch)] for o in outs]


def read_bytes(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def dali_frames(path: str, indices: list[int], gpu: bool = False) -> list[np.ndarray]:
    data = read_bytes(path)
    device = "gpu" if gpu else "cpu"
    (frames,) = run_dali(
        lambda b, k: (decode_video_frame(b, k, device),),
        [[data] * len(indices), [np.int32(i) for i in indices]],
        gpu=gpu,
    )
    return frames


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ----------------------------------------------------------------------------------------------
# Frame timing


def test_clip_frame_indices_follow_k_plus_half_second(clip):
    expected = [synth.frame_index(k) for k in CLIP_SECONDS]  # floor((k + 0.5) * 25)
    assert expected[0] == 12 and expected[9] == 237
    for path in (clip["webm"], clip["mp4"]):
        assert frames_at_seconds(path, [k + 0.5 for k in CLIP_SECONDS]) == expected
        assert frame_index_at(path, -1.0) == 0
        assert frame_index_at(path, 100.0) == 249  # clamped to the last frame


def test_frame_times_of_bframe_mp4_match_decoded_presentation_times(clip):
    with av.open(clip["mp4"]) as container:
        pts = [p.pts for p in container.demux(video=0) if p.size]
    assert pts != sorted(pts), "the mp4 should have B-frames (packets out of presentation order)"
    times = video_frame_times(clip["mp4"])
    np.testing.assert_allclose(times, decoded_times(decoded_frames(clip["mp4"])), atol=1e-9)
    np.testing.assert_allclose(times, np.arange(250) / 25.0, atol=1e-9)
    assert not times.flags.writeable


def test_frame_index_at_variable_frame_rate(vfr_webm):
    frames = decoded_frames(vfr_webm)
    times = video_frame_times(vfr_webm)
    assert len(times) == len(VFR_PTS) == len(frames)
    np.testing.assert_allclose(times, decoded_times(frames), atol=1e-9)
    # Times are relative to the first frame (at 7/30 s); WebM stores milliseconds.
    seconds = [-0.2, 0.0, 0.5, 1.98, 2.5, 3.0, 3.02, 100.0]
    expected = [0, 0, 15, 59, 59, 60, 60, 149]
    assert frames_at_seconds(vfr_webm, seconds) == expected
    assert [frame_index_at(vfr_webm, s) for s in seconds] == expected


def test_dali_start_frame_counts_presentation_order_on_vfr_portrait(vfr_webm):
    frames = decoded_frames(vfr_webm)
    indices = frames_at_seconds(vfr_webm, [0.5, 2.5, 3.0, 4.9])
    decoded = dali_frames(vfr_webm, indices)
    for index, got in zip(indices, decoded, strict=True):
        assert got.shape == (320, 240, 3)
        assert mean_abs(got, yuv_to_rgb_reference(frames[index])) < 0.1
        assert mean_abs(got, yuv_to_rgb_reference(frames[index + 1])) > 2.0


def test_several_frames_in_one_call_equal_one_call_each(clip):
    """The pretraining pipeline decodes a clip's two views in one decoder call (CPU): the same
    pixels as one call per frame, in either order and for a repeated frame."""
    data = read_bytes(clip["webm"])
    pairs = [(237, 12), (12, 237), (100, 100), (0, 249)]
    wanted = sorted({i for pair in pairs for i in pair})
    single = dict(zip(wanted, dali_frames(clip["webm"], wanted), strict=True))
    firsts, seconds = run_dali(
        lambda b, ks: decode_video_frames(b, ks, 2, "cpu"),
        [[data] * len(pairs), [np.array(p, np.int32) for p in pairs]],
    )
    for (i, j), first, second in zip(pairs, firsts, seconds, strict=True):
        assert np.array_equal(first, single[i]) and np.array_equal(second, single[j]), (i, j)
    assert not np.array_equal(single[12], single[237])


def keyframe_runs(path: str, frames: list[int]) -> int:
    """Packets from each frame's last keyframe through the frame, overlapping runs counted
    once (PyAV's keyframe flags, in presentation order)."""
    with av.open(path) as container:
        keys = [p.is_keyframe for p in container.demux(video=0) if p.size]
    needed = set()
    for f in frames:
        start = max(i for i in range(f + 1) if keys[i])
        needed.update(range(start, f + 1))
    return len(needed)


@pytest.mark.parametrize("which", ["clip", "vfr"])
def test_video_excerpt_decodes_the_same_frames(which, clip, vfr_webm):
    """An excerpt (IVF of the packets from each frame's keyframe on) decodes, at the positions
    it returns, the frames the whole file decodes at the original indices, bit for bit; it holds
    only the needed packets; a position one off decodes another frame."""
    path = clip["webm"] if which == "clip" else vfr_webm
    data = read_bytes(path)
    n = len(video_frame_times(path))
    pairs = [(0, 0), (49, 50), (50, 49), (237, 12), (100, 149), (n - 1, 3), (12, 13), (140, 77)]
    pairs = [(min(a, n - 1), min(b, n - 1)) for a, b in pairs]
    excerpts = [video_excerpt(path, data, list(pair)) for pair in pairs]
    whole = run_dali(
        lambda b, ks: decode_video_frames(b, ks, 2, "cpu"),
        [[data] * len(pairs), [np.array(p, np.int32) for p in pairs]],
    )
    cut = run_dali(
        lambda b, ks: decode_video_frames(b, ks, 2, "cpu"),
        [[e for e, _ in excerpts], [np.array(pos, np.int32) for _, pos in excerpts]],
    )
    for row, (pair, (excerpt, pos)) in enumerate(zip(pairs, excerpts, strict=True)):
        assert bytes(excerpt[:4]) == b"DKIF" and len(excerpt) < len(data)
        assert int.from_bytes(bytes(excerpt[24:28]), "little") == keyframe_runs(path, list(pair))
        for view in range(2):
            assert np.array_equal(cut[view][row], whole[view][row]), (pair, pos)
    # Control: the neighbouring position of the excerpt is another frame.
    excerpt, pos = excerpts[3]
    (other,) = run_dali(
        lambda b, k: (decode_video_frame(b, k, "cpu"),), [[excerpt], [np.int32(pos[0] - 1)]]
    )
    assert not np.array_equal(other[0], whole[0][3])


def test_video_excerpt_leaves_other_codecs_whole(clip):
    """H.264 (B-frames reorder packets) is not excerpted: the bytes and indices come back."""
    data = read_bytes(clip["mp4"])
    out, pos = video_excerpt(clip["mp4"], data, [200, 12])
    assert out is data and pos == [200, 12]


# ----------------------------------------------------------------------------------------------
# Decoded frames


def test_webm_frame_matches_yuv_reference(clip):
    frames = decoded_frames(clip["webm"])
    ks = [0, 3, 5, 9]
    indices = frames_at_seconds(clip["webm"], [k + 0.5 for k in ks])
    decoded = dali_frames(clip["webm"], indices)
    for k, index, got in zip(ks, indices, decoded, strict=True):
        assert got.shape == (240, 320, 3) and got.dtype == np.uint8
        right = mean_abs(got, yuv_to_rgb_reference(frames[index]))
        # Measured 0.003/255 (rounding ties only).
        assert right < 0.1, (k, right)
        # An off-by-one frame is clearly further away: the synthetic objects move every frame
        # (measured 0.85-2.4 for the neighbours).
        for wrong in (index - 1, index + 1):
            assert mean_abs(got, yuv_to_rgb_reference(frames[wrong])) > max(0.3, 20 * right)


def test_webm_frame_is_the_frames_layout_frame(clip):
    """The video frame for k and the frames-layout JPEG for k show the same picture."""
    ks = [1, 6]
    decoded = dali_frames(clip["webm"], frames_at_seconds(clip["webm"], [k + 0.5 for k in ks]))
    for k, got in zip(ks, decoded, strict=True):
        jpegs = {
            j: np.asarray(
                Image.open(frame_path(clip["frames"], clip["video_id"], j)).convert("RGB")
            )
            for j in (k - 1, k, k + 1)
        }
        same = mean_abs(got, jpegs[k])
        assert same < 4.0  # two lossy encodings of one picture
        assert mean_abs(got, jpegs[k - 1]) > 2 * same
        assert mean_abs(got, jpegs[k + 1]) > 2 * same


def test_jpeg_decode_matches_pil(clip):
    paths = [frame_path(clip["frames"], clip["video_id"], k) for k in (0, 5, 9)]
    (decoded,) = run_dali(
        lambda b: (decode_jpeg(b, "cpu"),), [[read_bytes(p) for p in paths]], layouts=None
    )
    for path, got in zip(paths, decoded, strict=True):
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert got.shape == ref.shape == (240, 320, 3)
        np.testing.assert_array_equal(got, ref)  # measured: identical


# ----------------------------------------------------------------------------------------------
# Clean view


def _clean_view_inputs(clip) -> list[np.ndarray]:
    landscape = np.asarray(Image.open(frame_path(clip["frames"], clip["video_id"], 4)))
    portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2))  # 240 wide x 320 high
    small = np.asarray(Image.fromarray(landscape).resize((200, 150), Image.BILINEAR))
    odd_margin = np.ascontiguousarray(landscape[7:233, 10:310])  # 300x226: crop offset x.5
    return [landscape, portrait, small, odd_margin]


def test_clean_view_matches_torchvision(clip):
    images = _clean_view_inputs(clip)
    (views,) = run_dali(lambda x: (clean_view(x, "cpu"),), [images], layouts="HWC")
    std = np.asarray(IMAGENET_STD)[:, None, None]
    for img, got in zip(images, views, strict=True):
        assert got.shape == (3, 224, 224) and got.dtype == np.float32
        diff = np.abs(got - torchvision_clean_view(img)) * std * 255.0  # in [0, 255] pixel units
        # Measured on these frames: mean 0.14-0.17, max 1.0-2.0 (one or two uint8 levels; PIL
        # rounds between its two resize passes, DALI keeps float). DALI's own resize_shorter +
        # centre crop rounds the long side and the crop offset differently: mean 1.0-2.0, max
        # 26-65 on these.
        assert diff.mean() < 0.3, (img.shape, diff.mean())
        assert diff.max() < 2.5, (img.shape, diff.max())


# ----------------------------------------------------------------------------------------------
# Codec checks and the frame command line


def test_check_decodable(clip, tmp_path):
    assert video_codec(clip["webm"]) == "vp9" and video_codec(clip["mp4"]) == "h264"
    check_decodable(clip["webm"], gpu=False)
    check_decodable(clip["mp4"], gpu=True)
    with pytest.raises(VideoCodecError) as err:
        check_decodable(clip["mp4"], gpu=False)
    assert clip["mp4"] in str(err.value) and "h264" in str(err.value)
    assert "GPU" in str(err.value) and "VP9" in str(err.value)
    missing = str(tmp_path / "missing.webm")
    with pytest.raises(FileNotFoundError, match="missing.webm"):
        check_decodable(missing, gpu=False)
    not_video = tmp_path / "notes.webm"
    not_video.write_text("not a video")
    with pytest.raises(ValueError, match="notes.webm"):
        check_decodable(str(not_video), gpu=False)


def test_frame_cli_webm_writes_the_decoded_frame(clip, tmp_path, capsys):
    out = tmp_path / "f.png"
    assert frame_cli.main([clip["webm"], "--second", "7", "--device", "cpu", str(out)]) == 0
    (expected,) = dali_frames(clip["webm"], [synth.frame_index(7)])
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_frame_cli_frames_folder_writes_the_jpeg_frame(clip, tmp_path):
    out = tmp_path / "f.png"
    argv = [clip["frames"], "--second", "2", "--video-id", clip["video_id"], "--device", "cpu"]
    assert frame_cli.main([*argv, str(out)]) == 0
    jpeg = frame_path(clip["frames"], clip["video_id"], 2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(jpeg)))


def test_frame_cli_errors_name_the_file(clip, tmp_path, capsys):
    out = str(tmp_path / "f.png")
    cases = [
        ([clip["webm"], "--second", "10"], [clip["webm"], "past the end"]),
        ([clip["webm"], "--second", "-1"], [">= 0"]),
        ([clip["frames"], "--second", "3"], [clip["frames"], "--video-id"]),
        ([clip["frames"], "--second", "10", "--video-id", clip["video_id"]], ["frame_10"]),
        ([str(tmp_path / "nope.webm"), "--second", "1"], ["nope.webm", "not found"]),
    ]
    for argv, needles in cases:
        assert frame_cli.main([*argv, "--device", "cpu", out]) == 1, argv
        message = capsys.readouterr().err
        for needle in needles:
            assert needle in message, (argv, message)
    assert not (tmp_path / "f.png").exists()


def test_frame_cli_h264_on_cpu_exits_with_codec_error(clip, tmp_path):
    out = tmp_path / "f.png"
    cmd = [sys.executable, "-m", "dali_pipelines.frame", clip["mp4"], "--second", "5"]
    result = subprocess.run(
        [*cmd, "--device", "cpu", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert clip["mp4"] in result.stderr and "h264" in result.stderr and "NVDEC" in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# GPU (NVDEC / nvJPEG)


@pytest.mark.cuda
def test_gpu_decodes_bframe_mp4_at_presentation_index(clip):
    assert torch.cuda.is_available()
    frames = decoded_frames(clip["mp4"])
    ks = [0, 5, 9]
    indices = frames_at_seconds(clip["mp4"], [k + 0.5 for k in ks])
    decoded = dali_frames(clip["mp4"], indices, gpu=True)
    for index, got in zip(indices, decoded, strict=True):
        assert got.shape == (240, 320, 3)
        # NVDEC output goes through DALI's own YUV->RGB kernel, not the CPU one: its distance to
        # the reference is not measured yet (no GPU here), so the bound is loose; the frame must
        # still be the nearest of its neighbours (an off-by-one or decode-order index fails).
        distances = {
            j: mean_abs(got, yuv_to_rgb_reference(frames[j])) for j in range(index - 2, index + 3)
        }
        assert distances[index] < 3.0, distances
        assert min(distances, key=distances.get) == index, distances


@pytest.mark.cuda
@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.65, 1.0])  # hybrid only, DALI's, hardware
def test_gpu_clean_view_and_jpeg_match_cpu(clip, hw_decoder_load):
    paths = [frame_path(clip["frames"], clip["video_id"], k) for k in (0, 9)]
    data = [[read_bytes(p) for p in paths]]
    cpu = run_dali(lambda b: (clean_view(decode_jpeg(b, "cpu"), "cpu"),), data)[0]
    gpu = run_dali(
        lambda b: (clean_view(decode_jpeg(b, "gpu", hw_decoder_load), "gpu"),), data, gpu=True
    )[0]
    std = np.asarray(IMAGENET_STD)[:, None, None]
    for a, b in zip(cpu, gpu, strict=True):
        assert b.shape == (3, 224, 224)
        assert (np.abs(a - b) * std * 255.0).mean() < 1.0  # nvJPEG IDCT and GPU resize differ
