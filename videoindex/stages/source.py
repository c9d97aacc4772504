"""Where a video's bytes come from: a local path, or one fsspec file object per video (object stores).

A video is opened once per job: its probe and its whole decode share one ``Source``. Remote bytes go
through a small LRU of 8 MiB blocks, so a sequential decode fetches each block once (bytes read = the
file's size, one GET per 8 MiB block: ``benchmarks/bench_decode.py``). Blocks read while a container is
opened (its header and index, e.g. an MP4's moov at the end of the file) are kept for the video's life:
the decode pass opens the container again, and demuxers read past the last frame into the index.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.caching import BlockCache, register_cache

from videoindex import storage

REMOTE_MAX_BLOCKS = 4  # 32 MiB of cached blocks per open video: the head, the index and the read position
REMOTE_BLOCK_SIZE = 8 * 2**20  # bytes per GET from object stores


class PinningBlockCache(BlockCache):
    """fsspec's LRU BlockCache that also keeps every block fetched while ``pinning`` is on, and fails
    fast once a fetch has failed: s3fs already retried it (5 x 5 tries, ~25 s), and a demuxer that
    reads again after an error would pay that again for every read of the same video."""

    name = "videoindex-pinning"

    def __init__(self, blocksize: int, fetcher: Any, size: int, maxblocks: int = 32) -> None:
        super().__init__(blocksize, fetcher, size, maxblocks)
        self.pinned: dict[int, bytes] = {}
        self.pinning = False
        self.failure: Exception | None = None

    def _fetch_block(self, block_number: int) -> bytes:
        if block_number in self.pinned:
            return self.pinned[block_number]
        if self.failure is not None:
            raise self.failure
        try:
            data = super()._fetch_block(block_number)
        except Exception as exc:
            self.failure = exc
            raise
        if self.pinning:
            self.pinned[block_number] = data
        return data


register_cache(PinningBlockCache, clobber=True)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class Source:
    """The bytes of one video: ``size()`` once, then ``open()`` / ``container()`` as often as needed."""

    def __init__(self, uri: str, fs: Any | None = None) -> None:
        if fs is None:
            fs, path = fsspec.core.url_to_fs(uri)
        else:
            path = fs._strip_protocol(uri)
        self.uri, self.fs, self.path = uri, fs, path
        self.local = "file" in _protocols(fs)
        self._remote: IO[bytes] | None = None
        self._size: int | None = None

    def size(self) -> int:
        """Bytes in the file (asked once); raises FileNotFoundError/PermissionError/IsADirectoryError."""
        if self._size is None:
            self._size = self._local_size() if self.local else self._remote_size()
        return self._size

    def _local_size(self) -> int:
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory, not a video file")
        with open(self.path, "rb"):  # permission errors now, not inside a decoder
            pass
        return os.path.getsize(self.path)

    def _remote_size(self) -> int:
        info = storage.with_retries(lambda: self.fs.info(self.path), what=f"stat {self.uri}")
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.uri} is a directory, not a video file")
        return int(info.get("size") or 0)

    def _handle(self) -> IO[bytes]:
        """One remote file object per video, rewound for each opener."""
        if self._remote is None:
            self._remote = self.fs.open(self.path, "rb", block_size=REMOTE_BLOCK_SIZE, cache_type=PinningBlockCache.name,
                                        cache_options={"maxblocks": REMOTE_MAX_BLOCKS})  # fmt: skip
        self._remote.seek(0)
        return self._remote

    def open(self) -> str | IO[bytes]:
        """The path (local) or the shared file object, kept open until close()."""
        return self.path if self.local else self._handle()

    def read_all(self) -> bytes:
        """The whole file in memory (decord reads object-store videos this way, once per video)."""
        handle = self._handle()
        return handle.read()

    @contextlib.contextmanager
    def container(self) -> Iterator[Any]:
        """A PyAV input container over the path or the shared remote file object."""
        import av

        where = self.open()
        cache = getattr(self._remote, "cache", None)
        pinning = isinstance(cache, PinningBlockCache)
        if pinning:
            cache.pinning = True  # what the demuxer reads to open the file: its header and index
        try:
            container = av.open(where, metadata_errors="ignore")
        finally:
            if pinning:
                cache.pinning = False
        with container:
            yield container

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None
