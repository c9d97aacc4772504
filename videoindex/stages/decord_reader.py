"""decord 0.6 reading (``--decoder decord``): random access by batches, resized after decode.

decord brings its own FFmpeg 4.1, applies the container's display matrix itself (checked on 90/180/270
degree files), has no AV1 decoder and fails on some tiny frame widths (16, 24, 48 px); a video it cannot
open or read is read with PyAV when ``decode.fallback_to_pyav`` (recorded). Frames come in groups of at
most ``READ_BUDGET`` bytes of full-resolution RGB, resized at once with the reference resize
(``preprocess.resize_frames``). The decord reader is dropped after each batch: a live one can keep
burning CPU after ``get_batch``. From an object store decord gets the file's bytes, read once per video
and held in memory while the video is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import resource
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from videoindex.memory import private_memory_bytes
from videoindex.stages.errors import DecodeError, classify_error
from videoindex.stages.source import Source
from videoindex.stages.video import Frame, VideoMeta, VideoReader, rotate

log = logging.getLogger(__name__)

DECORD_THREADS = 1  # one decode task holds one CPU slot
READ_BUDGET = 512 * 2**20  # full-resolution RGB bytes per get_batch (at least one frame)
DECODER_BUFFER_FRAMES = 10  # frames' worth of memory decord holds besides its output (measured, 4K)


def check_memory(frames: int, meta: VideoMeta, uri: str) -> None:
    """Raise out_of_memory when reading ``frames`` frames would pass this process's RLIMIT_DATA.

    decord aborts the whole process when an allocation fails inside get_batch (std::bad_alloc), so a
    read that cannot fit under the cap set by ``memory_cap`` is refused before it starts. Measured at
    4K: peak = 2x the frames (decoder output + numpy copy) + about 10 frames of decoder buffers.
    """
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    used = private_memory_bytes()
    if limit == resource.RLIM_INFINITY or used is None:
        return
    need = (2 * frames + DECODER_BUFFER_FRAMES) * meta.width * meta.height * 3
    if used + need > limit:
        raise DecodeError("out_of_memory", "decode", f"{uri}: reading {frames} frames of {meta.width}x"
                          f"{meta.height} needs about {need / 2**20:.0f} MiB; {max(limit - used, 0) / 2**20:.0f} "
                          "MiB left under decode.max_memory_mb", decoder=meta.decoder)  # fmt: skip


class _DecordFailed(Exception):
    def __init__(self, error: DecodeError) -> None:
        super().__init__(str(error))
        self.error = error


class DecordReader(VideoReader):
    """decord over a local path or the file's bytes; PyAV takes over if decord fails on a read."""

    def __init__(self, source: Source, probe: VideoMeta | None, *, fallback_to_pyav: bool) -> None:
        self._source, self._probe, self._fallback_ok = source, probe, fallback_to_pyav
        self._bytes: bytes | None = None
        vr = self._reader()
        frames, fps = len(vr), float(vr.get_avg_fps())
        if probe is None:  # PyAV could not probe it: no rotation or codec known
            height, width = vr[0].shape[:2]
            probe = VideoMeta(frames, fps, 0.0, width, height, 0, "unknown", "decord")
        duration = probe.duration_s or (frames / fps if fps else 0.0)
        self.meta = dataclasses.replace(probe, frames=frames, fps=fps, duration_s=duration, decoder="decord")

    def _reader(self) -> Any:
        import decord

        if self._source.local:
            return decord.VideoReader(self._source.path, ctx=decord.cpu(0), num_threads=DECORD_THREADS)
        if self._bytes is None:
            self._bytes = self._source.read_all()
        return decord.VideoReader(io.BytesIO(self._bytes), ctx=decord.cpu(0), num_threads=DECORD_THREADS)

    def frames(self, indices: Sequence[int], size: tuple[int, int] | None) -> Iterator[Frame]:
        wanted = sorted(set(indices))
        real = [i for i in wanted if i < self.meta.frames]
        if len(real) < len(wanted) and self.meta.frames:
            real = sorted({*real, self.meta.frames - 1})  # past the end: the last frame, once more
        per_read = max(1, READ_BUDGET // max(self.meta.width * self.meta.height * 3, 1))
        for start in range(0, len(real), per_read):
            try:
                batch = self._read(real[start : start + per_read], size)
            except _DecordFailed as failed:  # PyAV reads the rest, in one pass
                yield from self._switch_to_pyav(failed.error).frames(real[start:], size)
                return
            yield from batch

    def _read(self, group: list[int], size: tuple[int, int] | None) -> list[Frame]:
        check_memory(len(group), self.meta, self._source.uri)
        try:
            vr = self._reader()
            frames = vr.get_batch(group).asnumpy()
            times = self._sane_times(np.asarray(vr.get_frame_timestamp(group), np.float64)[:, 0], group)
            del vr  # a live decord reader may keep burning CPU after get_batch
        except Exception as exc:
            error = classify_error(exc, stage="decode", decoder="decord", uri=self._source.uri)
            if not self._fallback_ok or error.error_type in ("out_of_memory", "storage", "timeout"):
                raise error from exc
            raise _DecordFailed(error) from exc
        if frames.shape[1:3] != (self.meta.height, self.meta.width) and self.meta.rotation in (90, 270):
            frames = np.ascontiguousarray(np.stack([rotate(f, self.meta.rotation) for f in frames]))
        if size is not None:
            from videoindex.stages.preprocess import resize_frames

            frames = resize_frames(frames, size)
        return [(index, frames[k], float(times[k])) for k, index in enumerate(group)]

    def _sane_times(self, times: np.ndarray, wanted: list[int]) -> np.ndarray:
        """decord returns garbage (-3.7e17) for frames without pts (some AVI): use index / fps there."""
        limit = 2 * self.meta.duration_s + 1.0
        bad = ~np.isfinite(times) | (times < 0) | (times > limit)
        if bad.any() and self.meta.fps > 0:
            log.info("%s: %d decord timestamp(s) invalid; using index / fps", self._source.uri, bad.sum())
            times = np.where(bad, np.asarray(wanted, np.float64) / self.meta.fps, times)
        return times

    def _switch_to_pyav(self, error: DecodeError) -> VideoReader:
        from videoindex.stages.pyav_reader import PyAVReader

        log.warning("%s; decoding with pyav instead", error)
        pyav, self.fallback = PyAVReader(self._source, self._probe), error
        self.meta = dataclasses.replace(pyav.meta, decoder="pyav")
        return pyav

    def close(self) -> None:
        self._bytes = None
        self._source.close()


def open_decord(source: Source, probe: VideoMeta | None, *, fallback_to_pyav: bool, size: int) -> VideoReader:
    """A DecordReader, or a PyAV reader (with ``fallback`` set) when decord cannot open what PyAV can."""
    from videoindex.stages.pyav_reader import PyAVReader

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
