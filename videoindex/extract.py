"""Turn one video (or one chunk of its clips) into model-ready uint8 clips.

This is the unit of decode work: it runs in a CPU worker process anywhere in the cluster, and only its
result (resized, cropped uint8 clips plus metadata) travels to a model actor. Requires a VideoTask and
ExtractSettings; produces an ExtractResult with ``clips: uint8[C, T, S, S, 3]``.

Chunk 0 opens the video, reads its metadata, plans every clip and decodes the first ``chunk_clips`` of
them; later chunks decode their own clips only, so memory stays flat for long videos. Within a chunk,
frames are read in groups of at most ``max_memory_mb / 8`` of full-resolution RGB (one clip at least) and
cut down to crops at once. The whole decode runs under ``memory_cap(decode.max_memory_mb)``: past it the
video fails as ``out_of_memory`` and the worker process lives on.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from videoindex import storage
from videoindex.config import DecodeConfig, SamplingConfig
from videoindex.decode import VideoMeta, open_video
from videoindex.errors import DecodeError, classify_error
from videoindex.memory import memory_cap, private_memory_bytes
from videoindex.plan import VideoTask
from videoindex.preprocess import PreprocessSpec, resize_and_crop
from videoindex.sampling import ClipSpec, clip_times, plan_clips

log = logging.getLogger(__name__)
THUMBNAIL_SHORT_SIDE = 96
READ_BUDGET_SHARE = 8  # a read's full-resolution frames take at most max_memory_mb / 8
DECODER_BUFFER_FRAMES = 10  # frames' worth of memory a decoder holds besides its output (measured, 4K)


@dataclass(frozen=True)
class ExtractSettings:
    """Everything a decode worker needs besides the video itself."""

    sampling: SamplingConfig
    decode: DecodeConfig
    preprocess: PreprocessSpec
    clip_len: int = 16
    storage_options: dict[str, Any] = field(default_factory=dict)
    thumbnails: bool = False


@dataclass(frozen=True)
class ExtractRequest:
    video: VideoTask
    chunk: int = 0
    clips: tuple[ClipSpec, ...] | None = None  # None on chunk 0: plan them


@dataclass
class ExtractResult:
    """Decoded clips of one chunk, or the error that stopped the video."""

    request: ExtractRequest
    meta: VideoMeta | None = None
    all_clips: tuple[ClipSpec, ...] = ()  # every clip of the video (chunk 0 only)
    clips: tuple[ClipSpec, ...] = ()  # the clips decoded here
    frames: np.ndarray | None = None  # uint8[C, T, S, S, 3]
    times_s: list[tuple[float, float]] = field(default_factory=list)  # (start_s, end_s) per clip
    thumbnails: list[bytes | None] = field(default_factory=list)
    error: DecodeError | None = None
    recovered: list[DecodeError] = field(default_factory=list)  # non-fatal (e.g. decord -> PyAV fallback)
    size_bytes: int | None = None
    decode_s: float = 0.0
    cold_start: bool = False  # the first task of a new Ray worker process (set by the runner)


def thumbnail_jpeg(frame: np.ndarray) -> bytes:
    """uint8[H,W,3] -> JPEG bytes, short side THUMBNAIL_SHORT_SIDE (stored per clip; the report makes the same)."""
    from PIL import Image

    image = Image.fromarray(frame)
    scale = THUMBNAIL_SHORT_SIDE / min(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def check_memory(frames: int, meta: VideoMeta, uri: str) -> None:
    """Raise out_of_memory when reading ``frames`` frames would pass this process's RLIMIT_DATA.

    decord aborts the whole process when an allocation fails inside get_batch (std::bad_alloc), so a
    read that cannot fit under the cap set by memory_cap is refused before it starts. Measured
    at 4K: peak = 2x the frames (decoder output + numpy copy) + about 10 frames of decoder buffers.
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


def read_groups(clips: tuple[ClipSpec, ...], frame_bytes: int, budget: int) -> list[tuple[ClipSpec, ...]]:
    """Consecutive groups of ``clips`` whose distinct frames take at most ``budget`` bytes (>= 1 clip)."""
    groups: list[tuple[ClipSpec, ...]] = []
    current: list[ClipSpec] = []
    frames: set[int] = set()
    for spec in clips:
        wanted = frames | set(spec.frame_indices)
        if current and len(wanted) * frame_bytes > budget:
            groups.append(tuple(current))
            current, wanted = [], set(spec.frame_indices)
        current.append(spec)
        frames = wanted
    return [*groups, tuple(current)] if current else groups


def _decode_clips(
    reader: Any, clips: tuple[ClipSpec, ...], settings: ExtractSettings, result: ExtractResult
) -> None:
    """Read the clips' frames group by group and keep only their crops: ``uint8[C,T,S,S,3]``."""
    size = settings.preprocess.crop_size
    out = np.empty((len(clips), settings.clip_len, size, size, 3), np.uint8)
    frame_bytes = max(reader.meta.width * reader.meta.height * 3, 1)
    budget = max(settings.decode.max_memory_mb, 512) * 2**20 // READ_BUDGET_SHARE
    n = 0
    for group in read_groups(clips, frame_bytes, budget):
        wanted = sorted({i for c in group for i in c.frame_indices})
        check_memory(len(wanted), reader.meta, result.request.video.uri)
        frames, stamps = reader.read(wanted)
        position = {idx: k for k, idx in enumerate(wanted)}
        stamp_of = {idx: float(stamps[k]) for k, idx in enumerate(wanted)}
        for spec in group:
            clip = frames[[position[i] for i in spec.frame_indices]]
            out[n] = resize_and_crop(clip, settings.preprocess, crop_position=spec.spatial_crop)
            result.times_s.append(clip_times(spec, stamp_of, reader.meta.fps))
            if settings.thumbnails:
                result.thumbnails.append(thumbnail_jpeg(clip[len(clip) // 2]))
            n += 1
        del frames, clip
    result.frames = out


def opener(decoder: str) -> Any:
    """The function that opens a video: decode.open_video, or a plug-in "module:function"."""
    if ":" not in decoder:
        return open_video
    import importlib

    module, _, name = decoder.partition(":")
    return getattr(importlib.import_module(module), name)


def extract(request: ExtractRequest, settings: ExtractSettings) -> ExtractResult:
    """Decode one chunk of a video. Never raises for a bad video: the error is in the result."""
    started = time.perf_counter()
    result = ExtractResult(request=request, size_bytes=request.video.size_bytes)
    try:
        fs, path = storage.filesystem(request.video.uri, settings.storage_options)
        if result.size_bytes is None or request.chunk == 0:
            info = storage.with_retries(lambda: fs.info(path), what=f"stat {request.video.uri}")
            if info.get("type") == "directory":
                raise IsADirectoryError(f"{request.video.uri} is a directory, not a video file")
            result.size_bytes = info.get("size")
        if result.size_bytes == 0:
            raise DecodeError("empty_file", "open", f"{request.video.uri} is an empty file (0 bytes)")
        decoder = settings.decode.decoder if ":" not in settings.decode.decoder else "decord"
        open_fn = opener(settings.decode.decoder)
        with (
            memory_cap(settings.decode.max_memory_mb),
            open_fn(
                path, decoder=decoder, fs=fs, fallback_to_pyav=settings.decode.fallback_to_pyav
            ) as reader,
        ):
            result.meta = reader.meta
            clips = request.clips
            if clips is None:
                result.all_clips = tuple(plan_clips(reader.meta.frames, settings.sampling, settings.clip_len))
                if not result.all_clips:
                    raise DecodeError("corrupt", "probe", f"{request.video.uri}: no decodable frames")
                clips = result.all_clips[: settings.decode.chunk_clips]
            result.clips = clips
            _decode_clips(reader, clips, settings, result)
            result.meta = reader.meta  # decord may hand over to PyAV inside read(): record the decoder used
            if reader.fallback is not None:
                result.recovered.append(reader.fallback)
    except DecodeError as exc:
        result.error = exc
    except Exception as exc:  # a bad video must become a row, not a crashed shard
        result.error = classify_error(
            exc,
            size_bytes=result.size_bytes,
            stage="decode" if result.meta else "open",
            decoder=result.meta.decoder if result.meta else settings.decode.decoder,
            uri=request.video.uri,
        )
    if result.error is not None:
        result.frames = None
        log.info("decode failed for %s: %s: %s", request.video.uri, result.error.error_type, result.error)
    result.decode_s = time.perf_counter() - started
    return result


# A decode worker is a long-lived process (a Ray task worker): these run there, in a module that imports
# only what decoding needs, so a new worker starts in seconds less than one importing the runner.
_TASKS_IN_THIS_PROCESS = 0
WARM_UP_HOLD_S = 1.0  # a warm-up keeps its decode slot this long, so concurrent warm-ups get separate workers
DECODE_PRIORITY_ENV = "VIDEOINDEX_DECODE_PRIORITY"  # "idle": set in the decode tasks' runtime_env


def apply_decode_priority() -> None:
    """Put this thread (Ray runs a task on the worker's main thread; decoder threads it starts inherit
    the policy) at idle CPU priority when the task's environment asks for it. Once set it stays: the
    variable is part of the runtime_env, so only decode tasks asking the same ever run in this worker."""
    if os.environ.get(DECODE_PRIORITY_ENV) != "idle":
        return
    if not hasattr(os, "SCHED_IDLE"):  # not Linux
        log.warning(
            "%s=idle: this platform has no SCHED_IDLE; decoding runs at normal priority", DECODE_PRIORITY_ENV
        )
        return
    try:
        if os.sched_getscheduler(0) != os.SCHED_IDLE:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: decoding still works, only slower beside the model
        log.warning(
            "%s=idle: cannot set SCHED_IDLE (%s); decoding runs at normal priority", DECODE_PRIORITY_ENV, exc
        )


def extract_task(request: ExtractRequest, settings: ExtractSettings) -> ExtractResult:
    """``extract`` as a decode worker runs it: one torch thread (Ray would set the worker's CPUs, rounded
    down), and ``cold_start`` set when this is the first task of the process (it paid the start-up)."""
    global _TASKS_IN_THIS_PROCESS
    import torch

    torch.set_num_threads(1)
    apply_decode_priority()
    result = extract(request, settings)
    result.cold_start = _TASKS_IN_THIS_PROCESS == 0
    _TASKS_IN_THIS_PROCESS += 1
    return result


def warm_decode_worker() -> int:
    """Import what a decode needs (decord is imported lazily) so the first chunks find a ready worker;
    returns the worker's pid. It holds its slot a moment: Ray gives a queued task the worker its owner
    already leased, so warm-ups that ended at once would all run in the first worker to start."""
    global _TASKS_IN_THIS_PROCESS
    import decord  # noqa: F401

    apply_decode_priority()
    time.sleep(WARM_UP_HOLD_S)
    _TASKS_IN_THIS_PROCESS += 1
    return os.getpid()


def follow_up_requests(first: ExtractResult, chunk_clips: int) -> list[ExtractRequest]:
    """The requests for the clips chunk 0 did not decode."""
    rest = first.all_clips[len(first.clips) :]
    return [
        ExtractRequest(
            video=first.request.video, chunk=1 + n // chunk_clips, clips=tuple(rest[n : n + chunk_clips])
        )
        for n in range(0, len(rest), chunk_clips)
    ]
