"""The decode stage: one video in, a stream of model-ready clip batches out, each frame decoded once.

Lifecycle of one video, as ``decode_video`` yields it (the same generator runs in this process, in a
local decode worker process, or as a Ray streaming task with backpressure)::

    VideoPlan          probe: opened once, metadata read once, every clip planned
    ClipBatch ...      chunk k: uint8[C,T,S,S,3] crops of ``decode.chunk_clips`` clips, in clip order
    VideoEnd           the decoder that produced the clips, recovered problems
  or VideoFailure      at any point: the error that stops the video (a bad video is a row, not a crash)

The decoder reads forward once over the frames every clip needs (``VideoReader.frames``), resized to
the short side as it decodes; a chunk is cut as soon as its frames are in, and a frame is kept only
until the last chunk that uses it, so memory stays flat for a 2-hour video. Each step (probe, each
chunk) runs under ``memory_cap(decode.max_memory_mb)``: past it the video fails as ``out_of_memory`` and
the worker process lives on.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from videoindex import storage
from videoindex.config import DecodeConfig, SamplingConfig
from videoindex.format.plans import VideoTask
from videoindex.format.thumbnails import thumbnail_jpeg
from videoindex.memory import memory_cap
from videoindex.stages.errors import DecodeError, classify_error
from videoindex.stages.preprocess import PreprocessSpec, crop, resized_shape
from videoindex.stages.sampling import ClipSpec, clip_times, plan_clips
from videoindex.stages.video import Frame, VideoMeta, VideoReader, open_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    """Everything a decode worker needs besides the video itself; built once per job."""

    sampling: SamplingConfig
    decode: DecodeConfig
    preprocess: PreprocessSpec
    clip_len: int = 16
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    thumbnails: bool = False


@dataclass(frozen=True)
class VideoPlan:
    """A probed video: its metadata and every clip it will give."""

    video_id: str
    meta: VideoMeta
    clips: tuple[ClipSpec, ...]
    size_bytes: int | None


@dataclass(frozen=True)
class ClipBatch:
    """Chunk ``chunk`` of a video: ``frames`` uint8[C,T,S,S,3] for ``clips``, with their times in seconds."""

    video_id: str
    chunk: int
    clips: tuple[ClipSpec, ...]
    frames: np.ndarray
    times_s: tuple[tuple[float, float], ...]
    thumbnails: tuple[bytes | None, ...]
    decode_s: float


@dataclass(frozen=True)
class VideoEnd:
    """The video decoded to its last clip; ``meta.decoder`` is the decoder that produced the clips."""

    video_id: str
    meta: VideoMeta
    recovered: tuple[DecodeError, ...] = ()  # non-fatal problems (decord -> PyAV fallback)
    decode_s: float = 0.0
    cold_start: bool = False  # the first video of a new worker process, or the first to import torch there


@dataclass(frozen=True)
class VideoFailure:
    """The error that stopped a video; clips it gave before are dropped with it."""

    video_id: str
    error: DecodeError
    meta: VideoMeta | None = None
    size_bytes: int | None = None
    recovered: tuple[DecodeError, ...] = ()
    decode_s: float = 0.0
    cold_start: bool = False


VideoEvent = VideoPlan | ClipBatch | VideoEnd | VideoFailure
TERMINAL = (VideoEnd, VideoFailure)
OpenVideo = Callable[..., VideoReader]


def opener(decoder: str) -> tuple[OpenVideo, str]:
    """The function that opens a video and the decoder it gets: open_video, or a plug-in
    "module:function" with open_video's signature (tests inject faults this way; it wraps pyav)."""
    if ":" not in decoder:
        return open_video, decoder
    module, _, name = decoder.partition(":")
    return getattr(importlib.import_module(module), name), "pyav"


def probe(video: VideoTask, settings: DecodeSettings) -> tuple[VideoReader, VideoPlan]:
    """Open the video once, read its metadata and plan its clips; raises DecodeError for a bad video."""
    fs, _ = storage.filesystem(video.uri, settings.storage_options)
    open_fn, decoder = opener(settings.decode.decoder)
    options = (
        {"scale": settings.decode.scale} if settings.decode.scale != "rgb" else {}
    )  # plug-ins: the default
    reader = open_fn(
        video.uri, decoder=decoder, fs=fs, fallback_to_pyav=settings.decode.fallback_to_pyav, **options
    )
    clips = tuple(plan_clips(reader.meta.frames, settings.sampling, settings.clip_len))
    if not clips:
        reader.close()
        raise DecodeError(
            "corrupt", "probe", f"{video.uri}: no decodable frames", decoder=reader.meta.decoder
        )
    size = getattr(reader, "size_bytes", None) or video.size_bytes
    return reader, VideoPlan(video.video_id, reader.meta, clips, size)


class _Frames:
    """The reader's forward stream, held until used: every needed index gets a frame (a missing one the
    closest earlier frame; past the real end, the last one), and frames no later chunk needs are freed."""

    def __init__(self, stream: Iterator[Frame], needed: list[int], uri: str) -> None:
        self.stream, self.needed, self.uri = stream, needed, uri
        self.next = 0  # position in needed of the first index not yet assigned
        self.held: dict[int, tuple[np.ndarray, float]] = {}
        self.last: tuple[np.ndarray, float] | None = None
        self.substituted = 0

    def until(self, index: int) -> dict[int, tuple[np.ndarray, float]]:
        """Assign every needed index up to ``index``; returns the held frames."""
        while self.next < len(self.needed) and self.needed[self.next] <= index:
            got = next(self.stream, None)
            if got is None:  # the stream ended: the rest repeat the last frame
                self._fill(None)
                break
            self._fill(got)
        return self.held

    def _fill(self, got: Frame | None) -> None:
        position, frame, time_s = got if got is not None else (None, None, None)
        while self.next < len(self.needed) and (position is None or self.needed[self.next] < position):
            if self.last is None and frame is None:
                raise DecodeError("corrupt", "decode", f"{self.uri}: decoded no frame")
            self.held[self.needed[self.next]] = self.last or (frame, time_s)
            self.substituted += 1
            self.next += 1
        if got is not None:
            self.last = (frame, time_s)
            if self.next < len(self.needed) and self.needed[self.next] == position:
                self.held[position] = self.last
                self.next += 1

    def forget(self, below: int) -> None:
        for index in [i for i in self.held if i < below]:
            del self.held[index]


def _chunk_batch(k: int, clips: tuple[ClipSpec, ...], frames: dict[int, tuple[np.ndarray, float]],
                 plan: VideoPlan, settings: DecodeSettings) -> ClipBatch:  # fmt: skip
    size = settings.preprocess.crop_size
    out = np.empty((len(clips), settings.clip_len, size, size, 3), np.uint8)
    times, thumbs = [], []
    for n, spec in enumerate(clips):
        clip = np.stack([frames[i][0] for i in spec.frame_indices])
        out[n] = crop(clip, size, spec.spatial_crop)
        times.append(clip_times(spec, {i: frames[i][1] for i in spec.frame_indices}, plan.meta.fps))
        thumbs.append(thumbnail_jpeg(clip[len(clip) // 2]) if settings.thumbnails else None)
    return ClipBatch(plan.video_id, k, clips, out, tuple(times), tuple(thumbs), 0.0)


def decode_chunks(reader: VideoReader, plan: VideoPlan, settings: DecodeSettings, uri: str
                  ) -> Generator[ClipBatch, None, int]:  # fmt: skip
    """The video's clips in chunks of ``decode.chunk_clips``, from one forward pass of the reader;
    returns how many sampled frames were missing and repeat the frame before them."""
    per = settings.decode.chunk_clips
    chunks = [plan.clips[i : i + per] for i in range(0, len(plan.clips), per)]
    needed = sorted({i for c in plan.clips for i in c.frame_indices})
    size = resized_shape(plan.meta.height, plan.meta.width, settings.preprocess.resize_short_side)
    frames = _Frames(reader.frames(needed, size), needed, uri)
    firsts = [min(i for c in chunk for i in c.frame_indices) for chunk in chunks]
    keep_from = [min(firsts[k + 1 :], default=needed[-1] + 1) for k in range(len(chunks))]
    for k, clips in enumerate(chunks):
        started = time.perf_counter()
        with memory_cap(settings.decode.max_memory_mb):
            held = frames.until(max(i for c in clips for i in c.frame_indices))
            batch = _chunk_batch(k, clips, held, plan, settings)
            frames.forget(keep_from[k])
        yield _timed(batch, time.perf_counter() - started)
    if frames.substituted:
        log.warning("%s: %d sampled frame(s) not decodable (past the real end or lost) repeat the frame "
                    "before them (%s)", uri, frames.substituted, reader.meta.decoder)  # fmt: skip
    return frames.substituted


def _damage(reader: VideoReader, substituted: int, uri: str) -> tuple[DecodeError, ...]:
    """A recovered ``corrupt`` error when the decoder rejected packets after good frames: the video is
    indexed, with the frames it lost replaced by earlier ones, and its errors row says so."""
    bad = getattr(reader, "bad_packets", 0)
    if not bad:
        return ()
    message = (f"{uri}: {bad} packet(s) could not be decoded (first: {reader.first_bad}); {substituted} sampled "
               "frame(s) repeat the last good frame before them")  # fmt: skip
    return (DecodeError("corrupt", "decode", message, decoder=reader.meta.decoder),)


def _timed(batch: ClipBatch, seconds: float) -> ClipBatch:
    return replace(batch, decode_s=round(seconds, 6))


def decode_video(video: VideoTask, settings: DecodeSettings) -> Iterator[VideoEvent]:
    """Every event of one video, in order (see the module docstring). Never raises for a bad video."""
    started = time.perf_counter()
    reader: VideoReader | None = None
    plan: VideoPlan | None = None
    try:
        with memory_cap(settings.decode.max_memory_mb):
            reader, plan = probe(video, settings)
        yield plan
        substituted = yield from decode_chunks(reader, plan, settings, video.uri)
        recovered = (reader.fallback,) if reader.fallback is not None else ()
        recovered += _damage(reader, substituted, video.uri)
        yield VideoEnd(video.video_id, reader.meta, recovered, round(time.perf_counter() - started, 6))
    except Exception as exc:  # a bad video must become a row, not a crashed shard
        meta = reader.meta if reader is not None else None
        error = classify_error(exc, size_bytes=plan.size_bytes if plan else video.size_bytes,
                               stage="decode" if meta else "open", decoder=meta.decoder if meta else
                               opener(settings.decode.decoder)[1], uri=video.uri)  # fmt: skip
        log.info("decode failed for %s: %s: %s", video.uri, error.error_type, error)
        recovered = (reader.fallback,) if reader is not None and reader.fallback is not None else ()
        yield VideoFailure(video.video_id, error, meta, plan.size_bytes if plan else video.size_bytes, recovered,
                           round(time.perf_counter() - started, 6))  # fmt: skip
    finally:
        if reader is not None:
            reader.close()


def decode_inline(videos: list[VideoTask], settings: DecodeSettings) -> Iterator[VideoEvent]:
    """Every video's events in order, decoded in this process (tests, debugging, one-off reads)."""
    for video in videos:
        yield from decode_video(video, settings)
