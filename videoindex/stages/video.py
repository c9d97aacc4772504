"""Open a video: its metadata, and a forward stream of chosen frames, upright and resized, as RGB.

Requires a URI (local path or any fsspec URL). ``open_video`` returns a ``VideoReader`` with
``meta: VideoMeta`` and ``frames(indices, size)``, which yields ``(index, uint8[h,w,3], time_s)`` for
ascending frame indices (0-based, presentation order). Decoders behind the one interface:

- ``pyav`` (default, ``pyav_reader.py``): one sequential pass, each kept frame scaled by swscale as it
  comes, frames no clip needs skipped where the codec allows it; reads each byte once.
- ``decord`` (``decord_reader.py``): decord 0.6 with its own FFmpeg 4.1, random access by batches,
  resized after decode with the reference resize (``preprocess.resize_frames``).

Failures become ``DecodeError`` with one of ``format.errortypes.ERROR_TYPES``, so a bad video is a row,
not a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from videoindex.stages.errors import DecodeError, classify_error, library_message
from videoindex.stages.source import Source

log = logging.getLogger(__name__)

DECODERS = ("pyav", "decord")
Frame = tuple[int, np.ndarray, float]  # (index, uint8[h,w,3], presentation time in seconds)


@dataclass(frozen=True)
class VideoMeta:
    """What a decoder reports. Width and height are of the upright frame (after rotation)."""

    frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    rotation: int  # degrees clockwise to show upright (0, 90, 180, 270)
    codec: str
    decoder: str  # the decoder that produced the frames


class VideoReader:
    """One open video. ``frames`` may be called more than once, for ascending indices each time."""

    meta: VideoMeta
    fallback: DecodeError | None = None  # the first decoder's error when another one took over
    size_bytes: int | None = None  # the file's size, as open_video found it

    def frames(self, indices: Sequence[int], size: tuple[int, int] | None) -> Iterator[Frame]:
        """``(index, frame, time_s)`` for ``indices`` (ascending, unique): upright RGB frames resized to
        ``size`` = (height, width), or full resolution when None. Past the video's real end, the last
        decodable frame comes once more under its own index, after the last one asked for before it."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rotate(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored frame upright; ``rotation`` is clockwise degrees."""
    return np.rot90(frame, k=-(rotation // 90)) if rotation else frame


def stored_size(size: tuple[int, int], rotation: int) -> tuple[int, int]:
    """(height, width) of a stored frame that becomes ``size`` once turned upright."""
    return (size[1], size[0]) if rotation in (90, 270) else size


def read_frames(reader: VideoReader, indices: Sequence[int], size: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Frames ``uint8[N,h,w,3]`` and times ``float64[N]`` in the order of ``indices`` (any order, repeats);
    an index the video does not have gets the closest decodable frame before it."""
    wanted = sorted(set(indices))
    got: dict[int, tuple[np.ndarray, float]] = {}
    for index, frame, time_s in reader.frames(wanted, size):
        got[index] = (frame, time_s)
    if not got:
        raise DecodeError("corrupt", "decode", f"{reader.meta and reader.meta.decoder}: decoded no frame",
                          decoder=reader.meta.decoder)  # fmt: skip
    have = sorted(got)
    order = [substitute(i, have) for i in indices]
    return np.stack([got[i][0] for i in order]), np.array([got[i][1] for i in order], np.float64)


def substitute(index: int, decoded: Sequence[int]) -> int:
    """``index``, or the closest decoded index before it (the first one when none is before it)."""
    import bisect

    return decoded[max(bisect.bisect_right(decoded, index) - 1, 0)]


def open_video(uri: str, *, decoder: str, fs: Any = None, fallback_to_pyav: bool = True, scale: str = "rgb"
               ) -> VideoReader:  # fmt: skip
    """Open ``uri`` with ``decoder`` ("pyav" | "decord"); raises DecodeError for a bad video.

    ``fs``: an fsspec filesystem (default: from the URI). With decord, a video decord cannot open but
    PyAV can is read with PyAV when ``fallback_to_pyav``; ``reader.fallback`` records decord's error.
    ``scale``: how PyAV cuts frames down (``DecodeConfig.scale``); decord always converts to RGB first.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    from videoindex.stages.pyav_reader import PyAVReader, probe_pyav

    source = Source(uri, fs)
    size: int | None = None
    try:
        size = source.size()
        if size == 0:
            raise DecodeError("empty_file", "open", f"{uri}: empty file (0 bytes)", decoder=decoder)
        try:
            probe: VideoMeta | None = probe_pyav(source)
        except Exception as exc:
            if decoder == "pyav" or isinstance(exc, DecodeError):
                raise
            probe = None
            log.info("%s: pyav probe failed (%s); trying decord alone", uri, library_message(exc))
        if decoder == "pyav":
            reader: VideoReader = PyAVReader(source, probe, scale=scale)
        else:
            from videoindex.stages.decord_reader import open_decord

            reader = open_decord(source, probe, fallback_to_pyav=fallback_to_pyav, size=size)
        reader.size_bytes = size
        return reader
    except Exception as exc:
        source.close()
        raise classify_error(exc, size_bytes=size, stage="open", decoder=decoder, uri=uri) from exc
