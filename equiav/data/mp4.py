"""A small MP4/MOV (ISO base media file) scanner: the first video track's codec, size and
packets, without FFmpeg.

Why: as for WebM (``equiav.data.matroska``), the loader looks up per sample which frame of a
video file is shown at a given second (``dali_pipelines.video``). PyAV answers in ~2-3 ms per
MP4 file on the 2-core VM, most of it opening the container and wrapping each packet in a Python
object; a list longer than the per-process cache pays that on every sample. The answer is in the
``moov`` box's sample tables, which numpy reads in a fraction of the time.

What FFmpeg's mov demuxer gives for the common case is rebuilt from the tables: per sample the
decoding time (``stts``) plus the composition offset (``ctts``: B-frames), the byte span
(``stsz``, ``stsc``, ``stco``/``co64``) and the keyframe flag (``stss``). The scanner handles
one sample description, an edit list of empty edits (a delayed start) and at most one plain
entry that drops no sample (every timestamp shifts as FFmpeg shifts it), and no fragments.
Anything else (``moof`` fragments, several edits with media, an edit that starts after a sample
or ends before one, sample groups, a codec not in ``CODECS``, a file that is not ISO media)
makes :func:`scan` return None and the caller falls back to PyAV. Tests compare both on real
files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from equiav.data.matroska import Unsupported, VideoPackets

# Sample entry formats -> FFmpeg canonical codec names (the ones DALI's decoders know).
CODECS = {
    b"avc1": "h264",
    b"avc3": "h264",
    b"hvc1": "hevc",
    b"hev1": "hevc",
    b"mp4v": "mpeg4",
    b"av01": "av1",
    b"vp09": "vp9",
    b"vp08": "vp8",
    b"jpeg": "mjpeg",
    b"mjpa": "mjpeg",
}
# Top-level boxes a file may open with: anything else is not ISO media (or not one we read).
_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}


def _boxes(buf: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in [start, end)."""
    at = start
    while at < end:
        if at + 8 > end:
            raise Unsupported("truncated box header")
        size, kind = struct.unpack_from(">I4s", buf, at)
        head = 8
        if size == 1:  # 64-bit size after the type
            (size,) = struct.unpack_from(">Q", buf, at + 8)
            head = 16
        elif size == 0:  # the last box, to the end of its parent
            size = end - at
        if size < head or at + size > end:
            raise Unsupported(f"box {kind!r} of bad size")
        yield kind, at + head, at + size
        at += size


def _child(buf: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(payload start, end) of the first child box of type ``kind``, or None."""
    for k, a, b in _boxes(buf, start, end):
        if k == kind:
            return a, b
    return None


def _need(found: tuple[int, int] | None, what: str) -> tuple[int, int]:
    if found is None:
        raise Unsupported(f"no {what} box")
    return found


def _table(buf: bytes, start: int, width: int, dtype: str, at: int = 4) -> np.ndarray:
    """A full box's table: a u32 entry count at ``start + at``, then that many entries of
    ``width`` big-endian values of ``dtype`` (">u4", ">i4", ">u8"), as a (count, width) array."""
    (count,) = struct.unpack_from(">I", buf, start + at)
    return np.frombuffer(buf, dtype, count * width, start + at + 4).reshape(count, width)


def scan(buf: bytes) -> VideoPackets | None:
    """The first video track of an MP4/MOV file's bytes, or None when this scanner does not
    handle the file (not ISO media, no video track, or a feature the module docstring leaves
    to FFmpeg): then ask FFmpeg."""
    try:
        return _scan(buf)
    except (Unsupported, IndexError, KeyError, ValueError, struct.error):
        return None


def _scan(buf: bytes) -> VideoPackets | None:
    if len(buf) < 8 or buf[4:8] not in _FIRST_BOXES:
        return None
    moov = None
    for kind, a, b in _boxes(buf, 0, len(buf)):
        if kind == b"moof":
            raise Unsupported("fragmented file")
        if kind == b"moov":
            moov = (a, b)
    if moov is None:
        return None
    mvhd = _need(_child(buf, *moov, b"mvhd"), "mvhd")
    movie_scale = _timescale(buf, mvhd[0])
    for kind, a, b in _boxes(buf, *moov):
        if kind == b"trak":
            found = _video_track(buf, a, b, movie_scale)
            if found is not None:
                return found
    return None


def _timescale(buf: bytes, start: int) -> int:
    """The timescale of an mvhd or mdhd payload (its position depends on the box version)."""
    version = buf[start]
    (scale,) = struct.unpack_from(">I", buf, start + (20 if version == 1 else 12))
    if scale == 0:
        raise Unsupported("timescale 0")
    return scale


def _video_track(buf: bytes, start: int, end: int, movie_scale: int) -> VideoPackets | None:
    """The track's packets when it is a video track, else None."""
    mdia = _need(_child(buf, start, end, b"mdia"), "mdia")
    hdlr = _need(_child(buf, *mdia, b"hdlr"), "hdlr")
    if buf[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
        return None
    scale = _timescale(buf, _need(_child(buf, *mdia, b"mdhd"), "mdhd")[0])
    minf = _need(_child(buf, *mdia, b"minf"), "minf")
    stbl = _need(_child(buf, *minf, b"stbl"), "stbl")
    boxes = {k: (a, b) for k, a, b in _boxes(buf, *stbl)}

    codec, size = _sample_entry(buf, _need(boxes.get(b"stsd"), "stsd")[0])
    deltas = _table(buf, _need(boxes.get(b"stts"), "stts")[0], 2, ">u4").astype(np.int64)
    dts = np.concatenate([[0], np.cumsum(np.repeat(deltas[:, 1], deltas[:, 0]))])[:-1]
    count = len(dts)
    if count == 0:
        raise Unsupported("no samples")
    pts = dts
    if b"ctts" in boxes:  # composition offsets, signed as FFmpeg reads them (either version)
        runs = _table(buf, boxes[b"ctts"][0], 2, ">u4")
        signed = runs[:, 1].astype(np.uint32).view(np.int32).astype(np.int64)
        shift = np.repeat(signed, runs[:, 0].astype(np.int64))
        if len(shift) != count:
            raise Unsupported("ctts and stts count different samples")
        pts = dts + shift
    edts = _child(buf, start, end, b"edts")
    if edts is not None:  # FFmpeg's timeline follows the edit list: a constant shift here
        pts = pts + _edit_shift(buf, edts, pts, scale, movie_scale)

    if b"sbgp" in boxes:  # sample groups may mark open-GOP random access points as keys too
        raise Unsupported("sample groups")
    if b"stss" in boxes:  # sync samples, numbered from 1; without the box every one is a key
        keys = np.zeros(count, bool)
        numbers = _table(buf, boxes[b"stss"][0], 1, ">u4")[:, 0].astype(np.int64)
        if numbers.size and (numbers.min() < 1 or numbers.max() > count):
            raise Unsupported("sync sample number out of range")
        keys[numbers - 1] = True
    else:
        keys = np.ones(count, bool)
    sizes = _sample_sizes(buf, _need(boxes.get(b"stsz"), "stsz")[0], count)
    offsets = _sample_offsets(buf, boxes, sizes)
    if int((offsets + sizes).max()) > len(buf):
        raise Unsupported("a sample lies beyond the end of the file")
    spans = list(zip(offsets.tolist(), sizes.tolist(), strict=True))
    return VideoPackets(codec, size, Fraction(1, scale), pts.tolist(), spans, keys.tolist())


def _sample_entry(buf: bytes, start: int) -> tuple[str, tuple[int, int]]:
    """(codec, (height, width)) of the only sample description of an stsd payload."""
    (entries,) = struct.unpack_from(">I", buf, start + 4)
    if entries != 1:
        raise Unsupported(f"{entries} sample descriptions")
    kind = buf[start + 12 : start + 16]
    if kind not in CODECS:
        raise Unsupported(f"sample entry {kind!r}")
    # VisualSampleEntry: 8-byte box header, 6 reserved, data reference index (2), 16 bytes of
    # pre-defined and reserved fields, then width and height.
    width, height = struct.unpack_from(">HH", buf, start + 8 + 32)
    return CODECS[kind], (height, width)


def _edit_shift(
    buf: bytes, edts: tuple[int, int], pts: np.ndarray, scale: int, movie_scale: int
) -> int:
    """What FFmpeg adds to every timestamp for the track's edit list: the empty edits' length
    (a delayed start; movie timescale, rounded to the track's) minus the media time where the
    one plain edit begins. Unsupported unless that edit keeps every sample, at rate 1."""
    elst = _need(_child(buf, *edts, b"elst"), "elst")
    version = buf[elst[0]]
    (entries,) = struct.unpack_from(">I", buf, elst[0] + 4)
    fmt = ">QqhH" if version == 1 else ">IihH"
    edits = [
        struct.unpack_from(fmt, buf, elst[0] + 8 + i * struct.calcsize(fmt)) for i in range(entries)
    ]
    empty = 0
    while edits and edits[0][1] == -1:  # empty edits: nothing shown for their duration
        empty += edits.pop(0)[0]
    if not edits:
        return 0 if not empty else _rescale(empty, scale, movie_scale)
    if len(edits) != 1:
        raise Unsupported(f"{len(edits)} edits with media")
    duration, media_time, rate, fraction = edits[0]
    if media_time < 0 or rate != 1 or fraction != 0:
        raise Unsupported("an edit at another rate")
    if int(pts.min()) < media_time:
        raise Unsupported("the edit starts after a sample (FFmpeg would drop or discard it)")
    # The edit's duration is in the movie's timescale; 0 means "to the end of the media".
    if duration and int(pts.max()) >= media_time + duration * scale / movie_scale:
        raise Unsupported("the edit ends before a sample")
    return _rescale(empty, scale, movie_scale) - media_time


def _rescale(value: int, scale: int, movie_scale: int) -> int:
    """``value`` in the movie's timescale -> the track's, rounded half up (FFmpeg's rescale)."""
    return (value * scale + movie_scale // 2) // movie_scale


def _sample_offsets(buf: bytes, boxes: dict, sizes: np.ndarray) -> np.ndarray:
    """Each sample's byte offset in the file: its chunk's offset (stco or co64) plus the
    ``sizes`` of the samples before it in the chunk (stsc: how many samples each chunk holds)."""
    count = len(sizes)
    if b"stco" in boxes:
        chunks = _table(buf, boxes[b"stco"][0], 1, ">u4")[:, 0].astype(np.int64)
    else:
        chunks = _table(buf, _need(boxes.get(b"co64"), "stco or co64")[0], 1, ">u8")[:, 0]
        chunks = chunks.astype(np.int64)
    runs = _table(buf, _need(boxes.get(b"stsc"), "stsc")[0], 3, ">u4").astype(np.int64)
    if len(runs) == 0 or runs[0, 0] != 1 or np.any(np.diff(runs[:, 0]) <= 0):
        raise Unsupported("bad sample-to-chunk table")
    # Chunks first_chunk[i] .. first_chunk[i + 1] - 1 hold samples_per_chunk[i] samples each.
    firsts = np.append(runs[:, 0], len(chunks) + 1)
    per_chunk = np.repeat(runs[:, 1], np.diff(firsts))
    if len(per_chunk) != len(chunks) or int(per_chunk.sum()) < count:
        raise Unsupported("the chunks do not hold the samples")
    chunk_of = np.repeat(np.arange(len(chunks)), per_chunk)[:count]
    first_in_chunk = np.concatenate([[0], np.cumsum(per_chunk)])[chunk_of]
    before = np.concatenate([[0], np.cumsum(sizes)])  # bytes of samples 0..i-1
    return chunks[chunk_of] + before[:count] - before[first_in_chunk]


def _sample_sizes(buf: bytes, start: int, count: int) -> np.ndarray:
    """Each sample's size from an stsz payload (one size for all, or a table)."""
    fixed, n = struct.unpack_from(">II", buf, start + 4)
    if n != count:
        raise Unsupported("stsz and stts count different samples")
    if fixed:
        return np.full(count, fixed, np.int64)
    return np.frombuffer(buf, ">u4", count, start + 12).astype(np.int64)
