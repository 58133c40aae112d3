"""Media bytes by path, from a plain file or from a member of a WebDataset tar shard.

A dataset entry's media path is either a file or ``{shard}.tar:{member}`` (see
``equiav.data.index.shard_member``). Everything that reads media (the loader's source, the video
probe, the dataset checker) goes through :func:`store`, so every mode works on both layouts.

A member is read with one ``os.pread`` at the (offset, size) that the shard's DALI index file
(``{shard}.idx``, ``equiav.data.shard``) gives: no tar parsing per read, no seek state, so one
cached file descriptor per shard serves every thread of the process. The index of a shard is
loaded on first use and kept compactly (one row per clip, not one object per member); a shard
without an index file is scanned with ``tarfile`` once (logged, slow for big shards).

Shards are immutable once written (the writer renames finished files into place): a shard that
changes (another inode or mtime, as after a rewrite) is re-indexed and re-opened, and one that is
truncated after its index was written gives a ``CorruptMediaError`` naming ``shard.tar:member``.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from equiav.data.index import shard_member

log = logging.getLogger(__name__)


class CorruptMediaError(ValueError):
    """Media bytes are not a decodable file of their kind; the message names the file/member."""


@dataclass
class _Shard:
    stamp: tuple[int, int]  # (inode, mtime_ns) of the tar when it was indexed
    index: object  # equiav.data.shard.ShardIndex


class MediaStore:
    """Reads media of one process; keeps at most ``max_open`` shard file descriptors open."""

    def __init__(self, max_open: int = 256) -> None:
        self.max_open = max_open
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._shards: dict[str, _Shard] = {}
        self._fds: OrderedDict[tuple[str, tuple[int, int]], int] = OrderedDict()

    def read(self, path: str) -> np.ndarray:
        """The bytes of a file or shard member as a uint8 array.

        ``FileNotFoundError`` names a missing file, shard or member; ``CorruptMediaError`` a
        shard shorter than its index says.
        """
        ref = shard_member(path)
        if ref is None:
            with open(path, "rb") as f:
                return np.frombuffer(f.read(), dtype=np.uint8)
        tar, member = ref
        with self._lock:
            shard, st = self._shard(tar)
            offset, size = self._locate(shard, member, path)
            fd = self._fd(tar, shard.stamp)
            data = os.pread(fd, size, offset)
        if len(data) < size:
            raise CorruptMediaError(
                f"{path}: truncated shard (member of {size} bytes at offset {offset}, "
                f"{tar} holds {st.st_size} bytes)"
            )
        return np.frombuffer(data, dtype=np.uint8)

    def open(self, path: str) -> str | io.BytesIO:
        """What soundfile, PIL and PyAV open: the path of a file, the bytes of a shard member."""
        if shard_member(path) is None:
            return path
        return io.BytesIO(self.read(path).tobytes())

    def open_binary(self, path: str) -> BinaryIO:
        """A binary file object over a file or a shard member (the caller closes it)."""
        src = self.open(path)
        return open(src, "rb") if isinstance(src, str) else src

    def stat(self, path: str) -> tuple[int, int] | None:
        """(size, mtime_ns) of a file, or of a member (its shard's mtime); None when absent."""
        ref = shard_member(path)
        try:
            if ref is None:
                st = os.stat(path)
                return st.st_size, st.st_mtime_ns
            with self._lock:
                shard, st = self._shard(ref[0])
                _, size = self._locate(shard, ref[1], path)
            return size, st.st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _shard(self, tar: str) -> tuple[_Shard, os.stat_result]:
        if os.getpid() != self._pid:  # a forked child must not share the parent's descriptors
            self._reset()
        try:
            st = os.stat(tar)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {tar}") from None
        stamp = (st.st_ino, st.st_mtime_ns)
        shard = self._shards.get(tar)
        if shard is None or shard.stamp != stamp:
            from equiav.data.shard import load_index

            if shard is not None:  # rewritten: the old descriptor reads the old file
                fd = self._fds.pop((tar, shard.stamp), None)
                if fd is not None:
                    os.close(fd)
            shard = self._shards[tar] = _Shard(stamp, load_index(tar))
        return shard, st

    @staticmethod
    def _locate(shard: _Shard, member: str, path: str) -> tuple[int, int]:
        where = shard.index.locate(member)
        if where is None:
            raise FileNotFoundError(f"{path}: no such member in the shard")
        return where

    def _fd(self, tar: str, stamp: tuple[int, int]) -> int:
        key = (tar, stamp)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = os.open(tar, os.O_RDONLY)
        self._fds[key] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd


_STORE = MediaStore()


def store() -> MediaStore:
    """This process's media store."""
    return _STORE
