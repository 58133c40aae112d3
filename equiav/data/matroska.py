"""A small WebM/Matroska scanner: the first video track's codec, size and packets, without FFmpeg.

Why: the loader looks up, per sample, which frame of a video file is shown at a given second and
(on the CPU) where that frame's packets lie in the file (``dali_pipelines.video``). PyAV answers
in ~3-5 ms per file on the 2-core VM, mostly opening the container and wrapping each packet in a
Python object; a list longer than the per-process cache (4096 files) pays that on every sample.
Walking the EBML elements of a WebM file in Python takes a fraction of it.

The scanner reads what FFmpeg's Matroska demuxer would give for the common case: the video
track in SimpleBlocks without lacing, in a Segment of Clusters of known size, no content
encodings (compression or encryption). Anything else (video BlockGroups, lacing, unknown-size
clusters, a non-Matroska file) makes :func:`scan` return None and the caller falls back to
PyAV. Tests compare both on real files.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

# EBML / Matroska element ids (with their length-marker bits, as written in the file).
EBML = 0x1A45DFA3
SEGMENT = 0x18538067
INFO = 0x1549A966
TIMECODE_SCALE = 0x2AD7B1
TRACKS = 0x1654AE6B
TRACK_ENTRY = 0xAE
TRACK_NUMBER = 0xD7
TRACK_TYPE = 0x83
CODEC_ID = 0x86
VIDEO = 0xE0
PIXEL_WIDTH = 0xB0
PIXEL_HEIGHT = 0xBA
CONTENT_ENCODINGS = 0x6D80
CLUSTER = 0x1F43B675
CLUSTER_TIMECODE = 0xE7
SIMPLE_BLOCK = 0xA3
BLOCK_GROUP = 0xA0
BLOCK = 0xA1

TRACK_TYPE_VIDEO = 1
# Matroska codec ids -> FFmpeg canonical codec names (the ones DALI's decoders know).
CODECS = {"V_VP9": "vp9", "V_VP8": "vp8", "V_AV1": "av1", "V_MPEG4/ISO/AVC": "h264"}


class Unsupported(Exception):
    """The file uses a Matroska feature the scanner leaves to FFmpeg."""


class VideoPackets(NamedTuple):
    """The first video track as FFmpeg's demuxer gives it (packets in file order)."""

    codec: str  # FFmpeg canonical name
    size: tuple[int, int]  # (height, width): PixelHeight, PixelWidth
    time_base: Fraction  # seconds per timestamp unit (TimecodeScale / 1e9)
    pts: list[int]  # per packet, in time_base units
    spans: list[tuple[int, int] | None]  # per packet: (offset of its bytes in the file, size)
    keyframes: list[bool]


def _vint(buf: bytes, at: int, keep_marker: bool) -> tuple[int, int]:
    """(value, next position) of the variable-length integer at ``at``; -1 for "unknown"."""
    first = buf[at]
    if first == 0:
        raise Unsupported("vint longer than 8 bytes")
    length = 9 - first.bit_length()
    value = int.from_bytes(buf[at : at + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            value = -1
    return value, at + length


def _element(buf: bytes, at: int) -> tuple[int, int, int]:
    """(id, data start, data end) of the element at ``at``; end -1 when its size is unknown."""
    eid, at = _vint(buf, at, keep_marker=True)
    size, at = _vint(buf, at, keep_marker=False)
    return eid, at, (-1 if size < 0 else at + size)


def _children(buf: bytes, start: int, end: int):
    """(id, data start, data end) of each element in [start, end)."""
    at = start
    while at < end:
        eid, data, stop = _element(buf, at)
        if stop < 0 or stop > end:
            raise Unsupported(f"element {eid:#x} of unknown or overlong size")
        yield eid, data, stop
        at = stop


def _uint(buf: bytes, start: int, end: int) -> int:
    return int.from_bytes(buf[start:end], "big")


def _video_track(buf: bytes, start: int, end: int) -> tuple[int, str, tuple[int, int]] | None:
    """(track number, codec, (height, width)) of the first video track entry, or None."""
    for eid, a, b in _children(buf, start, end):
        if eid != TRACK_ENTRY:
            continue
        fields: dict[int, tuple[int, int]] = {e: (x, y) for e, x, y in _children(buf, a, b)}
        if TRACK_TYPE not in fields or _uint(buf, *fields[TRACK_TYPE]) != TRACK_TYPE_VIDEO:
            continue
        if CONTENT_ENCODINGS in fields:
            raise Unsupported("content encodings (compressed or encrypted packets)")
        codec_id = buf[slice(*fields[CODEC_ID])].rstrip(b"\0").decode("ascii", "replace")
        if codec_id not in CODECS:
            raise Unsupported(f"codec id {codec_id}")
        video = {e: (x, y) for e, x, y in _children(buf, *fields[VIDEO])}
        size = (_uint(buf, *video[PIXEL_HEIGHT]), _uint(buf, *video[PIXEL_WIDTH]))
        return _uint(buf, *fields[TRACK_NUMBER]), CODECS[codec_id], size
    return None


def scan(buf: bytes) -> VideoPackets | None:
    """The first video track of a WebM/Matroska file's bytes, or None when this scanner does
    not handle the file (not Matroska, no video track, or a feature listed in the module
    docstring): then ask FFmpeg."""
    try:
        return _scan(buf)
    except (Unsupported, IndexError, KeyError, ValueError):
        return None


def _scan(buf: bytes) -> VideoPackets | None:
    eid, _, end = _element(buf, 0)
    if eid != EBML or end < 0:
        return None
    eid, seg_start, seg_end = _element(buf, end)
    if eid != SEGMENT:
        return None
    # An unknown-size Segment (a live recording) runs to the end of the file.
    seg_end = len(buf) if seg_end < 0 or seg_end > len(buf) else seg_end
    scale, track = 1_000_000, None
    pts: list[int] = []
    spans: list[tuple[int, int]] = []
    keys: list[bool] = []
    for eid, a, b in _children(buf, seg_start, seg_end):
        if eid == INFO:
            for e, x, y in _children(buf, a, b):
                if e == TIMECODE_SCALE:
                    scale = _uint(buf, x, y)
        elif eid == TRACKS:
            track = _video_track(buf, a, b)
            if track is None:
                return None
        elif eid == CLUSTER:
            if track is None:
                raise Unsupported("a cluster before the track list")
            _cluster(buf, a, b, track[0], pts, spans, keys)
    if track is None or not pts:
        return None
    return VideoPackets(track[1], track[2], Fraction(scale, 10**9), pts, spans, keys)


def _cluster(buf, start, end, number, pts, spans, keys) -> None:
    """Append the cluster's blocks of track ``number``: timestamp, byte span, keyframe flag."""
    # The loop is written out (no helper calls per block): it runs once per packet of the file.
    base, at = 0, start
    while at < end:
        if buf[at] == SIMPLE_BLOCK:  # one-byte id; then the size, a vint
            first = buf[at + 1]
            n = 9 - first.bit_length()
            size = int.from_bytes(buf[at + 1 : at + 1 + n], "big") & ((1 << (7 * n)) - 1)
            data, stop = at + 1 + n, at + 1 + n + size
            if n == 9 or stop > end:
                raise Unsupported("simple block of bad size")
            track = buf[data]
            if track & 0x80:  # one-byte track number, the usual case
                track, head = track & 0x7F, data + 1
            else:
                track, head = _vint(buf, data, keep_marker=False)
            if track == number:
                flags = buf[head + 2]
                if flags & 0x06:
                    raise Unsupported("laced block")
                pts.append(base + int.from_bytes(buf[head : head + 2], "big", signed=True))
                spans.append((head + 3, stop - head - 3))
                keys.append(bool(flags & 0x80))
            at = stop
            continue
        eid, a, b = _element(buf, at)
        if b < 0 or b > end:
            raise Unsupported(f"element {eid:#x} of unknown or overlong size")
        if eid == CLUSTER_TIMECODE:
            base = _uint(buf, a, b)
        elif eid == BLOCK_GROUP:  # other tracks' (e.g. Opus with discard padding) are skipped
            for e, x, _ in _children(buf, a, b):
                if e == BLOCK and _vint(buf, x, keep_marker=False)[0] == number:
                    raise Unsupported("block group in the video track")
        at = b
