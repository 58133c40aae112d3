"""Visual decode stages: JPEG frames, single video frames, and the clean visual view.

The DALI functions take and return DataNodes and are meant to be called inside ``@pipeline_def``
functions. ``device`` is ``"gpu"`` when the pipeline has a device id (decoders then run as
``"mixed"``: nvJPEG / NVDEC) and ``"cpu"`` in DALI's CPU-only mode.

The host helpers (no DALI) read a video container's packet timestamps (WebM and MP4 with our own
scanners, ``equiav.data.matroska`` and ``equiav.data.mp4``, anything else with PyAV) to turn "the
frame at second t" into the frame index that ``fn.decoders.video(start_frame=...)`` expects, and
check that the codec can be decoded on the chosen device.
"""

from __future__ import annotations

import collections
import io
import os
import struct
import threading
from collections.abc import Sequence
from typing import NamedTuple

import av
import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import DataNode

from equiav.data import matroska, mp4
from equiav.data.media import CorruptMediaError, store

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The frame used for clip second k (frames layout: frame_{k}) sits at k + FRAME_OFFSET_S seconds.
FRAME_OFFSET_S = 0.5

# Codecs DALI 2.4's video decoder handles (canonical FFmpeg names). The CPU list is what the pip
# wheel's CPU variant decodes (MEASURED.md); the GPU list adds what NVDEC decodes.
CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_VIDEO_CODECS = CPU_VIDEO_CODECS | {"h264", "hevc", "mpeg4", "av1"}

# Tolerance when comparing a requested second with frame timestamps: container time bases
# (e.g. 1/1000 s for WebM) make frame times inexact, and a frame stamped at exactly k + 0.5 s
# must count as "at or before" it.
_TIME_EPS_S = 1e-6


class VideoCodecError(ValueError):
    """A video's codec cannot be decoded by DALI on the requested device."""


def _check_device(device: str) -> None:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def _decoder_device(device: str) -> str:
    """DALI decoders take encoded bytes on the host: their GPU variant is the 'mixed' backend."""
    _check_device(device)
    return "mixed" if device == "gpu" else "cpu"


# --------------------------------------------------------------------------------------------
# DALI graph functions
# --------------------------------------------------------------------------------------------


def decode_jpeg(jpeg_bytes: DataNode, device: str, hw_decoder_load: float = 0.65) -> DataNode:
    """Decode JPEG bytes (CPU node) to an HWC uint8 RGB image on ``device`` (nvJPEG on GPU).

    ``hw_decoder_load``: on the GPU, the share of images for the hardware JPEG decoder
    (A100/H100/H200; the rest take nvJPEG's hybrid path: Huffman decoding on the CPU threads);
    DALI's own default. The CPU decoder has no such choice and is not given it.
    """
    if not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
    backend = _decoder_device(device)
    extra = {"hw_decoder_load": hw_decoder_load} if backend == "mixed" else {}
    return fn.decoders.image(jpeg_bytes, device=backend, output_type=types.RGB, **extra)


def decode_video_frame(video_bytes: DataNode, frame_index: DataNode, device: str) -> DataNode:
    """Decode one frame of an encoded video to an HWC uint8 RGB image on ``device``.

    ``frame_index`` is a per-sample scalar (CPU node) counting frames in presentation order, as
    returned by :func:`frame_index_at`; DALI fails the batch for an index outside
    [0, number of frames), which :func:`frame_index_at` never returns.
    """
    # On the CPU, skipping DALI's frame index (a scan of every packet per call) is faster and
    # decodes the same frame (measured on the synthetic VP9 clips: 38 -> 27 ms for frame 237,
    # 6.9 -> 2.6 ms for frame 12, identical pixels); the GPU decoder keeps its default.
    extra = {"build_index": False} if device == "cpu" else {}
    sequence = fn.decoders.video(
        video_bytes,
        device=_decoder_device(device),
        start_frame=fn.cast(frame_index, dtype=types.INT32),
        sequence_length=1,
        **extra,
    )
    # (1, H, W, C) "FHWC" -> (H, W, C) "HWC".
    return fn.squeeze(sequence, axes=[0])


def decode_video_frames(
    video_bytes: DataNode, frame_indices: DataNode, count: int, device: str
) -> tuple[DataNode, ...]:
    """``count`` frames of one encoded video (``frame_indices``: a per-sample 1-D CPU node of
    ``count`` indices, as :func:`frame_index_at` returns them) in one decoder call: ``count`` HWC
    uint8 RGB images.

    On the CPU, without a frame index, the decoder reads the video from its start for each call:
    one call for a clip's two pretraining views decodes it once instead of twice (synthetic VP9
    clips: ~38 -> ~26 ms per sample on 2 threads, the same pixels). The GPU keeps one call per
    frame (:func:`decode_video_frame`): not yet measured there.
    """
    extra = {"build_index": False} if device == "cpu" else {}
    sequence = fn.decoders.video(
        video_bytes,
        device=_decoder_device(device),
        frames=fn.cast(frame_indices, dtype=types.INT32),
        **extra,
    )
    return tuple(sequence[i] for i in range(count))


def _center_crop_roi(frame: DataNode, image_size: int) -> tuple[DataNode, DataNode]:
    """Input-pixel ROI that torchvision's Resize(image_size) + CenterCrop(image_size) keeps.

    torchvision resizes the shorter side to ``image_size`` and the longer one to
    ``int(image_size * long / short)`` (truncated, so the two axes scale slightly differently),
    then crops at ``round((new - image_size) / 2)`` with Python's round-half-to-even. Resizing
    exactly this input region to image_size x image_size samples the same points as resize-then-
    crop (same scale per axis, so the same antialiasing filter) and only computes the kept pixels.
    """
    shape = frame.shape()  # CPU node even for GPU frames (dynamic executor)
    h, w = shape[0], shape[1]
    short, long = dmath.min(h, w), dmath.max(h, w)
    new_long = (image_size * long) // short  # == int(size * long / short) for positive ints
    portrait = h > w
    new_h = portrait * new_long + (1 - portrait) * image_size
    new_w = portrait * image_size + (1 - portrait) * new_long

    def half_even_offset(new_extent: DataNode) -> DataNode:
        margin = new_extent - image_size
        half = margin // 2
        # Odd margin: x.5 rounds up only when the floor is odd (half to even).
        return half + (margin % 2) * (half % 2)

    def as_float(x: DataNode) -> DataNode:
        return fn.cast(x, dtype=types.FLOAT)

    scale_y = as_float(h) / as_float(new_h)
    scale_x = as_float(w) / as_float(new_w)
    top = as_float(half_even_offset(new_h))
    left = as_float(half_even_offset(new_w))
    roi_start = fn.stack(top * scale_y, left * scale_x)
    roi_end = fn.stack((top + image_size) * scale_y, (left + image_size) * scale_x)
    return roi_start, roi_end


def clean_view(frame: DataNode, device: str, image_size: int = 224) -> DataNode:
    """The clean visual view: float32 CHW (3, image_size, image_size), ImageNet-normalised.

    Matches torchvision ``Resize(image_size, BICUBIC, antialias=True)``, ``CenterCrop(image_size)``,
    ``ToTensor()``, ``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` on the PIL image (the resize is
    rounded to uint8 like PIL's before normalising).
    """
    _check_device(device)
    roi_start, roi_end = _center_crop_roi(frame, image_size)
    resized = fn.resize(
        frame,
        device=device,
        size=[image_size, image_size],
        roi_start=roi_start,
        roi_end=roi_end,
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )
    return fn.crop_mirror_normalize(
        resized,
        device=device,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in IMAGENET_MEAN],
        std=[255.0 * s for s in IMAGENET_STD],
    )


# --------------------------------------------------------------------------------------------
# Host helpers: codec checks and frame times (PyAV demuxing only, no decoding)
# --------------------------------------------------------------------------------------------


class _VideoProbe(NamedTuple):
    codec: str
    size: tuple[int, int]  # (height, width) of the decoded frames
    times: np.ndarray  # sorted presentation times in seconds, relative to the first frame
    # Where excerpts apply (see video_excerpt): each frame's packet as (offset in the file, size),
    # in presentation order, and which of them are keyframes; else None.
    packets: np.ndarray | None = None
    keyframes: np.ndarray | None = None


# Codecs whose packets can be cut into an IVF excerpt: one packet per shown frame (VP9 packs its
# hidden frames into superframes), decode order = presentation order, and keyframes reset every
# reference. VP8 in WebM may carry invisible frames as packets of their own: not excerpted.
_EXCERPT_CODECS = {"vp9": b"VP90"}


# Probes kept per process, least recently used first out; keyed by (path, mtime, size) so that
# a rewritten file is probed again. The lock: a ThreadedLoader's thread may probe beside the
# main thread.
PROBE_CACHE_SIZE = 4096
_probes: collections.OrderedDict[tuple[str, int, int], _VideoProbe] = collections.OrderedDict()
_probes_lock = threading.Lock()


def clear_probe_cache() -> None:
    """Forget every cached probe (benchmarks: as when a list outgrows the cache)."""
    with _probes_lock:
        _probes.clear()


def _probe_bytes(path: str, raw: bytes) -> _VideoProbe:
    """The probe of a video file's bytes (``path`` names it in errors)."""
    # WebM and MP4 files are scanned in Python (per 10 s clip on the VM: WebM ~0.5 ms, MP4's
    # sample tables ~0.2 ms; PyAV 2-5 ms): this runs per sample when a list outgrows the cache.
    # FFmpeg reads whatever the scanners leave.
    found = matroska.scan(raw) or mp4.scan(raw) or _demux(path, raw)
    # DALI's frame index holds one entry per packet of the stream, stamped with pts (dts when
    # pts is missing), sorted by that stamp; the decoder emits frames in the same order.
    order = np.asarray(found.pts, dtype=np.int64)
    pts = np.sort(order)
    times = (pts - pts[0]).astype(np.float64) * float(found.time_base)
    times.flags.writeable = False  # shared through the cache
    # Excerpts need every packet located, in presentation order (no reordering), starting with
    # a keyframe.
    excerptable = (
        found.codec in _EXCERPT_CODECS
        and None not in found.spans
        and found.keyframes[0]
        and bool(np.all(np.diff(order) > 0))
    )
    if not excerptable:
        return _VideoProbe(found.codec, found.size, times)
    packets = np.asarray(found.spans, dtype=np.int64)
    keyframes = np.asarray(found.keyframes, dtype=bool)
    packets.flags.writeable = keyframes.flags.writeable = False
    return _VideoProbe(found.codec, found.size, times, packets, keyframes)


def _demux(path: str, raw: bytes) -> matroska.VideoPackets:
    """The first video stream's packets as FFmpeg demuxes them (PyAV); a span is None where
    the packet's bytes are not found whole in the file, or not looked for (codecs that are not
    excerpted)."""
    try:
        container = av.open(io.BytesIO(raw))
    except av.FFmpegError as err:
        raise ValueError(f"{path}: cannot open as a video container ({err})") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.codec.canonical_name
        locate = codec in _EXCERPT_CODECS
        stamps, spans, keys = [], [], []
        for packet in container.demux(stream):
            if packet.size == 0:  # PyAV's end-of-stream flush packet
                continue
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None:
                raise ValueError(f"{path}: video packets carry no timestamps")
            stamps.append(stamp)
            spans.append(_locate_packet(raw, packet) if locate else None)
            keys.append(packet.is_keyframe)
        if not stamps:
            raise ValueError(f"{path}: video stream has no frames")
        size = (stream.codec_context.height, stream.codec_context.width)
        return matroska.VideoPackets(codec, size, stream.time_base, stamps, spans, keys)


def _locate_packet(raw: bytes, packet: av.Packet) -> tuple[int, int] | None:
    """(offset, size) of a packet's bytes in the file, or None where they are not found there
    whole (the container's block header precedes them: search a few bytes after ``pos``)."""
    data = bytes(packet)
    if packet.pos is None or packet.pos < 0:
        return None
    offset = raw.find(data[:64], packet.pos, packet.pos + 64 + len(data))
    if offset < 0 or raw[offset : offset + len(data)] != data:
        return None
    return offset, len(data)


def _probe(path: str | os.PathLike, data: np.ndarray | None = None) -> _VideoProbe:
    """The file's probe, cached. ``data``: the file's bytes when the caller has read them
    already (a cache miss then reads nothing again; ignored unless their size is the file's)."""
    path = os.fspath(path)
    stat = store().stat(path)  # a file, or a shard member (equiav.data.media)
    if stat is None:
        raise FileNotFoundError(f"video file not found: {path}")
    key = (path, stat[1], stat[0])
    with _probes_lock:
        found = _probes.get(key)
        if found is not None:
            _probes.move_to_end(key)
            return found
    if data is None or data.size != stat[0]:
        data = store().read(path)
    found = _probe_bytes(path, data.tobytes())
    with _probes_lock:
        _probes[key] = found
        while len(_probes) > PROBE_CACHE_SIZE:
            _probes.popitem(last=False)
    return found


def frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the first video stream's frames, from the container's headers."""
    return _probe(path).size


def video_codec(path: str | os.PathLike) -> str:
    """Canonical FFmpeg name of the first video stream's codec ('vp9', 'h264', ...)."""
    return _probe(path).codec


def check_decodable(path: str | os.PathLike, gpu: bool) -> None:
    """Raise VideoCodecError (naming file and codec) if DALI cannot decode this video.

    Without a GPU only VP8, VP9 and MJPEG decode: DALI's CPU video decoder lacks H.264, HEVC,
    MPEG-4 Part 2 and AV1. Raises FileNotFoundError / ValueError for missing or unreadable files.
    """
    codec = video_codec(path)
    if gpu and codec not in GPU_VIDEO_CODECS:
        raise VideoCodecError(
            f"{os.fspath(path)}: video codec '{codec}' is not supported by DALI's video decoder "
            f"(supported: {', '.join(sorted(GPU_VIDEO_CODECS))}); convert it to VP9 or extract "
            "frames to the frame_{k}/{video_id}.jpg layout"
        )
    if not gpu and codec not in CPU_VIDEO_CODECS:
        raise VideoCodecError(
            f"{os.fspath(path)}: video codec '{codec}' cannot be decoded by DALI's CPU video "
            f"decoder (CPU supports: {', '.join(sorted(CPU_VIDEO_CODECS))}); it needs a GPU with "
            "NVDEC, or convert it to VP9 (WebM) or to the frame_{k}/{video_id}.jpg frames layout"
        )


def video_frame_times(path: str | os.PathLike, data: np.ndarray | None = None) -> np.ndarray:
    """Sorted presentation times (seconds, first frame at 0) of every frame; read-only, cached.

    Found by demuxing packets (no decoding); cached per (path, mtime, size). ``data``: the
    file's bytes, if already read (see ``_probe``).
    """
    return _probe(path, data).times


def _index_at(times: np.ndarray, second: float) -> int:
    index = int(np.searchsorted(times, second + _TIME_EPS_S, side="right")) - 1
    return min(max(index, 0), len(times) - 1)


def frame_index_at(path: str | os.PathLike, second: float) -> int:
    """Index (presentation order, DALI's ``start_frame``) of the last frame shown at ``second``.

    That is the last frame whose timestamp, relative to the stream's first frame, is <= second,
    clamped to [0, number of frames - 1].
    """
    return _index_at(video_frame_times(path), second)


# How far past a video's last frame a requested second may lie (strict lookups): a clip a little
# shorter than its list says keeps its last frame; a file cut short mid-run is an error.
END_SLACK_S = 1.0


def frames_at_seconds(
    path: str | os.PathLike,
    seconds: Sequence[float],
    strict: bool = False,
    data: np.ndarray | None = None,
) -> list[int]:
    """:func:`frame_index_at` for several seconds with one probe of the file. ``strict``: a
    second more than ``END_SLACK_S`` past the last frame raises ``CorruptMediaError`` (naming
    the file) instead of giving the last frame. ``data``: the file's bytes, if already read."""
    times = video_frame_times(path, data)
    if strict and max(seconds) > times[-1] + END_SLACK_S:
        raise CorruptMediaError(
            f"{os.fspath(path)}: video ends at {times[-1]:.2f} s, before the frame at "
            f"{max(seconds):.2f} s (truncated?)"
        )
    return [_index_at(times, s) for s in seconds]


def video_excerpt(
    path: str | os.PathLike, data: np.ndarray, frames: Sequence[int]
) -> tuple[np.ndarray, list[int]]:
    """A smaller video that decodes ``frames`` of ``data`` (the bytes of ``path``) exactly: an
    IVF stream of the packets from each frame's last keyframe through the frame, and the frames'
    indices in it. Returns ``data`` and ``frames`` unchanged where the codec or the container
    does not allow it (see ``_EXCERPT_CODECS``).

    Why: DALI's CPU video decoder decodes from the start of the file whatever the index (measured
    on the synthetic VP9 clips: frames [200, 201] cost ~30 ms, as much as decoding 200 frames),
    where PyAV seeks to the keyframe. The excerpt starts at keyframes, so DALI decodes at most a
    GOP per frame; the pixels are the same (tested bit for bit against decoding the whole file).
    """
    probe = _probe(path)
    if probe.packets is None:
        return data, list(frames)
    keys = np.flatnonzero(probe.keyframes)
    runs: list[list[int]] = []  # [first packet, last packet], sorted, disjoint
    for first, last in sorted(
        (int(keys[np.searchsorted(keys, f, "right") - 1]), int(f)) for f in frames
    ):
        if runs and first <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last])
    index, starts, count = [], [], 0
    for first, last in runs:
        starts.append(count - first)
        index.extend(range(first, last + 1))
        count += last - first + 1
    positions = []
    for f in frames:
        run = next(r for r, (first, last) in enumerate(runs) if first <= f <= last)
        positions.append(int(f) + starts[run])
    return _ivf(probe, data, index), positions


def _ivf(probe: _VideoProbe, data: np.ndarray, packets: Sequence[int]) -> np.ndarray:
    """An IVF file (32-byte header, then per frame a 12-byte header: size, pts) holding the
    given packets of ``data``, numbered 0, 1, ... (DALI counts decoded frames, not stamps)."""
    height, width = probe.size
    spans = probe.packets[np.asarray(packets)]
    header = struct.pack(
        "<4sHH4sHHIIII",
        b"DKIF",
        0,
        32,
        _EXCERPT_CODECS[probe.codec],
        width,
        height,
        25,
        1,
        len(spans),
        0,
    )
    out = np.empty(len(header) + 12 * len(spans) + int(spans[:, 1].sum()), np.uint8)
    out[: len(header)] = np.frombuffer(header, np.uint8)
    at = len(header)
    for pts, (offset, size) in enumerate(spans.tolist()):
        out[at : at + 12] = np.frombuffer(struct.pack("<IQ", size, pts), np.uint8)
        out[at + 12 : at + 12 + size] = data[offset : offset + size]
        at += 12 + size
    return out


def clip_second(k: int) -> float:
    """Time in the video of the frame that stands for clip second k (frames layout frame_{k})."""
    return k + FRAME_OFFSET_S
