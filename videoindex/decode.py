"""Decode: open a video, read its metadata, and return chosen frames upright as RGB.

Requires a URI (local path or any fsspec URL) and frame indices (0-based, in presentation order).
Produces ``VideoMeta`` and, per ``read``, ``uint8[N,H,W,3]`` frames in the order asked for, with
``float64[N]`` presentation times in seconds. Two decoders sit behind one interface:

- ``DecordReader`` (default): decord 0.6 with its own FFmpeg 4.1. It applies the container's display
  matrix itself (checked on 90/180/270 degree files), has no AV1 decoder, and fails on some tiny frame
  widths (16, 24, 48 px). It is dropped right after each ``read`` because a live decord reader can keep
  burning CPU after ``get_batch``.
- ``PyAVReader``: PyAV with FFmpeg 8; decodes sequentially and keeps only the wanted frames; seeks
  for indices far from the start using an exact packet-pts index (correct for variable frame rate).

Failures become ``DecodeError`` with one of ``ERROR_TYPES`` (see ``errors.py``), so a bad video is a row,
not a crash.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import av
import fsspec
import numpy as np

from videoindex.errors import (  # re-exported: decode errors are part of this stage's interface
    ERROR_TYPE_DOC,
    ERROR_TYPES,
    DecodeError,
    classify_error,
    library_message,
)

__all__ = ["ERROR_TYPE_DOC", "ERROR_TYPES", "DecodeError", "VideoMeta", "VideoReader", "classify_error",
           "open_video"]  # fmt: skip

log = logging.getLogger(__name__)

SEEK_MIN_FRAMES = 250  # PyAV: seek only when the first wanted frame is further than this from the start
DECORD_THREADS = 1  # one decode task holds one CPU; 2 threads halve decord's time on 720p
REMOTE_MAX_BLOCKS = 4  # 32 MiB of cached blocks per open video
REMOTE_BLOCK_SIZE = 8 * 2**20  # bytes per read from object stores


@dataclass(frozen=True)
class VideoMeta:
    """What a decoder reports. Width and height are of the upright frame (after rotation)."""

    frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    rotation: int  # degrees clockwise to show upright (the legacy "rotate" tag: 0, 90, 180, 270)
    codec: str
    decoder: str  # decord | pyav: the decoder that produced the frames


class _Source:
    """Where bytes come from: a local path string (fast path) or one fsspec file object (remote)."""

    def __init__(self, uri: str, fs: Any | None) -> None:
        if fs is None:
            fs, path = fsspec.core.url_to_fs(uri)
        else:
            path = fs._strip_protocol(uri)
        self.uri, self.fs, self.path = uri, fs, path
        self.local = "file" in _protocols(fs)
        self._remote: IO[bytes] | None = None

    def size(self) -> int:
        """Bytes in the file; raises FileNotFoundError/PermissionError/IsADirectoryError like open()."""
        if self.local:
            if os.path.isdir(self.path):
                raise IsADirectoryError(f"{self.path} is a directory, not a video file")
            with open(self.path, "rb"):
                pass
            return os.path.getsize(self.path)
        info = self.fs.info(self.path)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.uri} is a directory, not a video file")
        return int(info.get("size") or 0)

    def _handle(self) -> IO[bytes]:
        """One remote file object per video, shared by the probe and the decoders and rewound for each,
        with a small LRU of 8 MiB blocks: the file head is fetched once, not once per opener."""
        if self._remote is None:
            self._remote = self.fs.open(self.path, "rb", block_size=REMOTE_BLOCK_SIZE, cache_type="blockcache",
                                        cache_options={"maxblocks": REMOTE_MAX_BLOCKS})  # fmt: skip
        self._remote.seek(0)
        return self._remote

    def open(self) -> str | IO[bytes]:
        """The path (local) or the shared file object, kept open until close() (decord reads it whole)."""
        return self.path if self.local else self._handle()

    @contextlib.contextmanager
    def container(self) -> Iterator[Any]:
        """A PyAV input container over the path or the shared remote file object."""
        with av.open(self.path if self.local else self._handle(), metadata_errors="ignore") as container:
            yield container

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _probe_pyav(source: _Source) -> VideoMeta:
    """Container facts and the display rotation (which PyAV only shows on a decoded frame)."""
    with source.container() as container:
        if not container.streams.video:
            raise DecodeError("no_video_stream", "probe", f"{source.uri}: no video stream", decoder="pyav")
        stream = container.streams.video[0]
        first = next(container.decode(stream), None)
        rotation = round((first.rotation if first is not None else 0) / 90) * 90
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, -90, 270):
            width, height = height, width
        return VideoMeta(
            frames=max(int(stream.frames or 0), 0),  # 0 when the container does not say
            fps=float(rate) if rate else 0.0,
            duration_s=duration,
            width=width,
            height=height,
            rotation=(-rotation) % 360,
            codec=stream.codec_context.codec.canonical_name,
            decoder="pyav",
        )


def _rotate(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored frame upright; ``rotation`` is clockwise degrees."""
    return np.rot90(frame, k=-(rotation // 90)) if rotation else frame


def _substitute(indices: Sequence[int], decoded: Sequence[int], uri: str, decoder: str) -> list[int]:
    """Each index, or the closest decoded frame before it (past the real end: the last frame).

    Metadata frame counts can be wrong and files can end early; this reads on instead of failing.
    """
    out = [decoded[max(bisect.bisect_right(decoded, i) - 1, 0)] for i in indices]
    if out != list(indices):
        changed = sum(a != b for a, b in zip(out, indices, strict=True))
        log.warning("%s: %d requested frame(s) not decodable (last decodable frame %d) replaced by an "
                    "earlier frame (%s)", uri, changed, decoded[-1], decoder)  # fmt: skip
    return out


class VideoReader:
    """Shared lifecycle: context manager, close(), and the recorded fallback."""

    meta: VideoMeta
    fallback: DecodeError | None = None
    clamped: bool = False  # a read asked for frames past the real end and got the last frame instead

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PyAVReader(VideoReader):
    """Sequential PyAV decoding that keeps only the wanted frames; seeks for far-away indices."""

    def __init__(self, source: _Source, probe: VideoMeta | None = None) -> None:
        self._source = source
        self._pts: list[int] | None = None
        probe = probe or _probe_pyav(source)
        frames = probe.frames or len(self._packet_pts())  # mkv does not say: count packets
        duration = probe.duration_s or (frames / probe.fps if probe.fps else 0.0)
        self.meta = dataclasses.replace(probe, frames=frames, duration_s=duration, decoder="pyav")

    def _packet_pts(self) -> list[int]:
        """Sorted pts of every video packet (demux only, no decoding): frame index -> pts."""
        if self._pts is None:
            with self._source.container() as container:
                stream = container.streams.video[0]
                pts = [p.pts for p in container.demux(stream) if p.size]
            self._pts = sorted(pts) if None not in pts else []
        return self._pts

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Frames ``uint8[N,H,W,3]`` upright and times ``float64[N]`` s, in the order of ``indices``."""
        wanted = sorted(set(indices))
        if not wanted:
            return np.empty((0, self.meta.height, self.meta.width, 3), np.uint8), np.empty(0)
        got: dict[int, tuple[np.ndarray, float]] = {}
        if wanted[0] > SEEK_MIN_FRAMES:
            got = self._decode(wanted, seek=True)
        if not got:
            got = self._decode(wanted, seek=False)
        if not got:
            raise DecodeError(
                "corrupt", "decode", f"{self._source.uri}: pyav decoded no frame", decoder="pyav"
            )
        order = _substitute(indices, sorted(got), self._source.uri, "pyav")
        self.clamped = self.clamped or order != list(indices)
        frames = np.stack([got[i][0] for i in order])
        return frames, np.array([got[i][1] for i in order], np.float64)

    def _decode(self, wanted: list[int], *, seek: bool) -> dict[int, tuple[np.ndarray, float]]:
        """Decode up to the last wanted frame; returns {index: (frame, time_s)} plus the last frame seen.

        With ``seek``, frame indices come from the packet-pts index; {} means: decode from the start.
        """
        pts_index = self._packet_pts() if seek else []
        if seek and len(pts_index) <= wanted[0]:
            return {}
        position = {p: n for n, p in enumerate(pts_index)}
        keep = set(wanted)
        got: dict[int, tuple[np.ndarray, float]] = {}
        with self._source.container() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if seek:
                container.seek(pts_index[wanted[0]], stream=stream, backward=True)
            index, frame = -1, None
            for frame in _frames(container, stream, self._source.uri):
                index = position.get(frame.pts, -1) if seek else index + 1
                if seek and (index < 0 or (not got and index > wanted[0])):
                    log.info("%s: seek landed off the pts index; decoding from the start", self._source.uri)
                    return {}
                if index in keep:
                    got[index] = (self._array(frame), float(frame.time or 0.0))
                if index >= wanted[-1]:
                    break
            if frame is not None and index not in got and index >= 0:
                got[index] = (self._array(frame), float(frame.time or 0.0))  # the real last frame
        return got

    def _array(self, frame: av.VideoFrame) -> np.ndarray:
        return np.ascontiguousarray(_rotate(frame.to_ndarray(format="rgb24"), self.meta.rotation))

    def close(self) -> None:
        self._source.close()


def _frames(container: Any, stream: Any, uri: str) -> Iterator[av.VideoFrame]:
    """Decoded frames; a decoding error after the first frame ends the video early (logged)."""
    decoded = 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            yield frame
    except av.error.FFmpegError as exc:
        if not decoded:
            raise
        log.warning("%s: pyav stopped after %d frames: %s", uri, decoded, library_message(exc))


class DecordReader(VideoReader):
    """decord over a local path or a file object (decord reads it whole into memory)."""

    def __init__(self, source: _Source, probe: VideoMeta | None, *, fallback_to_pyav: bool) -> None:
        self._source, self._probe, self._fallback_ok = source, probe, fallback_to_pyav
        self._vr: Any = None
        self._pyav: PyAVReader | None = None
        vr = self._reader()
        frames, fps = len(vr), float(vr.get_avg_fps())
        if probe is None:  # PyAV could not probe it: no rotation or codec known
            height, width = vr[0].shape[:2]
            probe = VideoMeta(frames, fps, 0.0, width, height, 0, "unknown", "decord")
        duration = probe.duration_s or (frames / fps if fps else 0.0)
        self.meta = dataclasses.replace(probe, frames=frames, fps=fps, duration_s=duration, decoder="decord")

    def _reader(self) -> Any:
        if self._vr is None:
            import decord

            self._vr = decord.VideoReader(self._source.open(), ctx=decord.cpu(0), num_threads=DECORD_THREADS)
        return self._vr

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Frames ``uint8[N,H,W,3]`` upright and times ``float64[N]`` s, in the order of ``indices``."""
        if not len(indices):
            return np.empty((0, self.meta.height, self.meta.width, 3), np.uint8), np.empty(0)
        order = _substitute(indices, range(self.meta.frames), self._source.uri, "decord")
        self.clamped = self.clamped or list(order) != list(indices)
        wanted = sorted(set(order))
        if self._pyav is not None:  # decord failed on an earlier read: stay with PyAV
            return self._read_with_pyav(indices, self.fallback)
        try:
            vr = self._reader()
            frames = vr.get_batch(wanted).asnumpy()
            times = self._sane_times(np.asarray(vr.get_frame_timestamp(wanted), np.float64)[:, 0], wanted)
        except Exception as exc:
            error = classify_error(exc, stage="decode", decoder="decord", uri=self._source.uri)
            if not self._fallback_ok or error.error_type in ("out_of_memory", "storage", "timeout"):
                raise error from exc
            return self._read_with_pyav(indices, error)
        finally:
            self._vr = None  # a live decord reader may keep burning CPU after get_batch
        if frames.shape[1:3] != (self.meta.height, self.meta.width) and self.meta.rotation in (90, 270):
            frames = np.ascontiguousarray(np.stack([_rotate(f, self.meta.rotation) for f in frames]))
        position = {idx: n for n, idx in enumerate(wanted)}
        take = [position[i] for i in order]
        return frames[take], times[take]

    def _sane_times(self, times: np.ndarray, wanted: list[int]) -> np.ndarray:
        """decord returns garbage (-3.7e17) for frames without pts (some AVI): use index / fps there."""
        limit = 2 * self.meta.duration_s + 1.0
        bad = ~np.isfinite(times) | (times < 0) | (times > limit)
        if bad.any() and self.meta.fps > 0:
            log.info("%s: %d decord timestamp(s) invalid; using index / fps", self._source.uri, bad.sum())
            times = np.where(bad, np.asarray(wanted, np.float64) / self.meta.fps, times)
        return times

    def _read_with_pyav(
        self, indices: Sequence[int], error: DecodeError | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._pyav is None:
            log.warning("%s; decoding with pyav instead", error)
            self._pyav, self.fallback = PyAVReader(self._source, self._probe), error
        frames, times = self._pyav.read(indices)
        self.clamped = self.clamped or self._pyav.clamped
        self.meta = dataclasses.replace(self._pyav.meta, decoder="pyav")
        return frames, times

    def close(self) -> None:
        self._vr = None
        self._source.close()


def open_video(uri: str, *, decoder: str, fs: Any = None, fallback_to_pyav: bool = True) -> VideoReader:
    """Open ``uri`` with ``decoder`` ("decord" | "pyav"); raises DecodeError for a bad video.

    ``fs``: an fsspec filesystem (default: from the URI). With decord, a video decord cannot open but
    PyAV can is read with PyAV when ``fallback_to_pyav``; ``reader.fallback`` records decord's error.
    """
    if decoder not in ("decord", "pyav"):
        raise ValueError(f"decoder must be decord or pyav, got {decoder!r}")
    source = _Source(uri, fs)
    size: int | None = None
    try:
        size = source.size()
        if size == 0:
            raise DecodeError("empty_file", "open", f"{uri}: empty file (0 bytes)", decoder=decoder)
        try:
            probe: VideoMeta | None = _probe_pyav(source)
        except Exception as exc:
            if decoder == "pyav" or isinstance(exc, DecodeError):
                raise
            probe = None
            log.info("%s: pyav probe failed (%s); trying decord alone", uri, library_message(exc))
        if decoder == "pyav":
            return PyAVReader(source, probe)
        return _open_decord(source, probe, fallback_to_pyav=fallback_to_pyav, size=size)
    except Exception as exc:
        source.close()
        raise classify_error(exc, size_bytes=size, stage="open", decoder=decoder, uri=uri) from exc


def _open_decord(
    source: _Source, probe: VideoMeta | None, *, fallback_to_pyav: bool, size: int
) -> VideoReader:
    try:
        return DecordReader(source, probe, fallback_to_pyav=fallback_to_pyav)
    except Exception as exc:
        error = classify_error(exc, size_bytes=size, stage="open", decoder="decord", uri=source.uri)
        if probe is not None and error.error_type in ("no_video_stream", "not_a_video"):
            # PyAV found a video stream, so decord lacks the codec (AV1) or chokes on the container.
            error = DecodeError("unsupported_codec" if error.error_type == "no_video_stream" else "not_a_video",
                                "open", f"{error} (codec {probe.codec}; pyav can read it)", decoder="decord")  # fmt: skip
        if probe is None or not fallback_to_pyav:
            raise error from exc
        log.warning("%s; falling back to pyav", error)
        reader = PyAVReader(source, probe)
        reader.fallback = error
        return reader
