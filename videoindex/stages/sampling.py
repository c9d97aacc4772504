"""Clip sampling: which frames of a video form each clip. Pure and deterministic.

Requires the frame count of a video and a SamplingConfig; produces ``ClipSpec``s whose
``frame_indices`` (frames of the source video, 0-based) are ``clip_len`` long. Strategies:

- ``sliding``: back-to-back clips (span ``clip_len * clip_stride`` frames) that tile the whole video;
  a last clip aligned to the end covers any tail.
- ``uniform``: ``clips_per_video`` clips with evenly spread centres.
- ``ssv2``: the VideoMAE/TSN test protocol: ``clip_len`` equal segments, one frame per segment per
  temporal view, each view taken with 1 (centre) or 3 (start/centre/end) spatial crops.

A video shorter than one clip gives a single ``padded`` clip whose indices repeat.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from videoindex.config import SamplingConfig

CROPS_BY_COUNT = {1: (0,), 3: (1, 0, 2)}  # spatial_crop: 0 centre, 1 start (left/top), 2 end


@dataclass(frozen=True)
class ClipSpec:
    """One clip: ``frame_indices`` (frames, ascending, may repeat when ``padded``) and its view/crop."""

    clip_index: int
    frame_indices: tuple[int, ...]
    temporal_view: int = 0
    spatial_crop: int = 0
    padded: bool = False


def plan_clips(num_frames: int, cfg: SamplingConfig, clip_len: int = 16) -> list[ClipSpec]:
    """The clips of a video of ``num_frames`` frames, numbered 0..n-1; [] when it has no frames."""
    if num_frames <= 0:
        return []
    if cfg.strategy == "ssv2":
        clips = _ssv2(num_frames, cfg, clip_len)
    elif num_frames < clip_len * cfg.clip_stride:
        clips = [ClipSpec(0, _padded_indices(num_frames, clip_len), padded=True)]
    elif cfg.strategy == "sliding":
        clips = _strided(_sliding_starts(num_frames, clip_len * cfg.clip_stride), cfg.clip_stride, clip_len)
    elif cfg.strategy == "uniform":
        starts = _uniform_starts(num_frames, clip_len * cfg.clip_stride, cfg.clips_per_video)
        clips = _strided(starts, cfg.clip_stride, clip_len)
    else:
        raise ValueError(f"sampling.strategy {cfg.strategy!r} is not one of sliding, uniform, ssv2")
    return cap_clips(clips, cfg.max_clips_per_video)


def _padded_indices(num_frames: int, clip_len: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.round(np.linspace(0, num_frames - 1, clip_len)))


def _sliding_starts(num_frames: int, span: int) -> list[int]:
    starts = list(range(0, num_frames - span + 1, span))
    if starts[-1] + span < num_frames:
        starts.append(num_frames - span)  # the tail, aligned to the end
    return starts


def _uniform_starts(num_frames: int, span: int, count: int) -> list[int]:
    centres = [(k + 0.5) * num_frames / count for k in range(count)]
    return [min(max(round(c - span / 2), 0), num_frames - span) for c in centres]


def _strided(starts: Sequence[int], stride: int, clip_len: int) -> list[ClipSpec]:
    return [ClipSpec(n, tuple(start + k * stride for k in range(clip_len))) for n, start in enumerate(starts)]


def _ssv2(num_frames: int, cfg: SamplingConfig, clip_len: int) -> list[ClipSpec]:
    tick = num_frames / clip_len
    crops = CROPS_BY_COUNT.get(cfg.spatial_crops)
    if crops is None:
        raise ValueError(f"sampling.spatial_crops must be 1 or 3, got {cfg.spatial_crops}")
    clips: list[ClipSpec] = []
    for view in range(cfg.temporal_views):
        offset = tick * (view + 0.5) / cfg.temporal_views
        indices = tuple(min(math.floor(offset + tick * k), num_frames - 1) for k in range(clip_len))
        for crop in crops:
            clips.append(ClipSpec(len(clips), indices, view, crop, padded=num_frames < clip_len))
    return clips


def cap_clips(clips: list[ClipSpec], max_clips: int | None) -> list[ClipSpec]:
    """At most ``max_clips`` clips, evenly spaced, first and last kept, renumbered 0..n-1."""
    if max_clips is None or len(clips) <= max_clips:
        return clips
    keep = sorted({int(i) for i in np.round(np.linspace(0, len(clips) - 1, max_clips))})
    return [replace(clips[i], clip_index=n) for n, i in enumerate(keep)]


def clip_times(spec: ClipSpec, timestamps_s: Mapping[int, float], fps: float) -> tuple[float, float]:
    """(start_s, end_s) of a clip: the first sampled frame's time to the end of the last one (seconds).

    ``timestamps_s`` maps frame index -> presentation time; missing frames fall back to index / fps.
    """
    first, last = spec.frame_indices[0], spec.frame_indices[-1]
    frame_s = 1.0 / fps if fps > 0 else 0.0
    start = timestamps_s.get(first, first * frame_s)
    end = timestamps_s.get(last, last * frame_s) + frame_s
    return float(start), float(end)
