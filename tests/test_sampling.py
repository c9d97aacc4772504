"""Clip sampling: coverage, padding, caps and the ssv2 protocol."""

from __future__ import annotations

import pytest

from videoindex.config import SamplingConfig
from videoindex.stages.sampling import ClipSpec, cap_clips, clip_times, plan_clips


@pytest.mark.parametrize("num_frames", [64, 65, 100, 127, 128, 310, 1000])
def test_sliding_covers_every_frame(num_frames: int) -> None:
    clips = plan_clips(num_frames, SamplingConfig(strategy="sliding", clip_stride=4))
    covered = set()
    for clip in clips:
        assert len(clip.frame_indices) == 16 and not clip.padded
        assert all(b - a == 4 for a, b in zip(clip.frame_indices[:-1], clip.frame_indices[1:], strict=True))
        assert clip.frame_indices[0] >= 0 and clip.frame_indices[-1] < num_frames
        covered.update(range(clip.frame_indices[0], clip.frame_indices[0] + 64))
    assert covered == set(range(num_frames))
    assert [c.clip_index for c in clips] == list(range(len(clips)))
    starts = [c.frame_indices[0] for c in clips]
    assert starts == sorted(starts) and starts[0] == 0


def test_sliding_tiles_then_aligns_tail_to_end() -> None:
    clips = plan_clips(150, SamplingConfig(clip_stride=4))
    assert [c.frame_indices[0] for c in clips] == [0, 64, 86]
    assert clips[-1].frame_indices[-1] == 86 + 60


@pytest.mark.parametrize("strategy", ["sliding", "uniform"])
@pytest.mark.parametrize("num_frames", [1, 3, 12, 63])
def test_short_video_gives_one_padded_clip(strategy: str, num_frames: int) -> None:
    clips = plan_clips(num_frames, SamplingConfig(strategy=strategy, clip_stride=4))
    assert len(clips) == 1 and clips[0].padded
    indices = clips[0].frame_indices
    assert len(indices) == 16 and indices[0] == 0 and indices[-1] == num_frames - 1
    assert list(indices) == sorted(indices)


@pytest.mark.parametrize("num_frames", [0, -5])
def test_no_frames_no_clips(num_frames: int) -> None:
    for strategy in ("sliding", "uniform", "ssv2"):
        assert plan_clips(num_frames, SamplingConfig(strategy=strategy)) == []


def test_uniform_spreads_clips_inside_the_video() -> None:
    clips = plan_clips(1000, SamplingConfig(strategy="uniform", clips_per_video=8, clip_stride=2))
    assert len(clips) == 8
    starts = [c.frame_indices[0] for c in clips]
    assert starts == sorted(starts) and starts[0] >= 0 and clips[-1].frame_indices[-1] < 1000
    centres = [(c.frame_indices[0] + c.frame_indices[-1]) / 2 for c in clips]
    assert centres[0] == pytest.approx(62.5 - 1, abs=1.5) and centres[-1] == pytest.approx(937.5 - 1, abs=1.5)
    edge = plan_clips(70, SamplingConfig(strategy="uniform", clips_per_video=3, clip_stride=4))
    assert [c.frame_indices[0] for c in edge] == [0, 3, 6]  # clamped: every clip fits in 70 frames


def test_ssv2_three_crops_two_views_is_six_clips() -> None:
    clips = plan_clips(160, SamplingConfig(strategy="ssv2", temporal_views=2, spatial_crops=3))
    assert len(clips) == 6
    assert [(c.temporal_view, c.spatial_crop) for c in clips] == [
        (0, 1),
        (0, 0),
        (0, 2),
        (1, 1),
        (1, 0),
        (1, 2),
    ]
    assert [c.clip_index for c in clips] == list(range(6))
    # tick = 10 frames: view 0 takes offset 2.5 -> 2, view 1 offset 7.5 -> 7 in each segment
    assert clips[0].frame_indices == tuple(range(2, 160, 10))
    assert clips[3].frame_indices == tuple(range(7, 160, 10))
    assert not any(c.padded for c in clips)


def test_ssv2_one_crop_and_short_video() -> None:
    clips = plan_clips(100, SamplingConfig(strategy="ssv2", temporal_views=1, spatial_crops=1))
    assert len(clips) == 1 and clips[0].spatial_crop == 0
    assert clips[0].frame_indices == tuple(int(6.25 * (k + 0.5)) for k in range(16))
    short = plan_clips(5, SamplingConfig(strategy="ssv2", temporal_views=2, spatial_crops=1))
    assert len(short) == 2 and all(c.padded for c in short)
    assert all(0 <= i < 5 for c in short for i in c.frame_indices)


def test_cap_keeps_first_and_last_evenly() -> None:
    clips = plan_clips(64 * 20, SamplingConfig(clip_stride=4, max_clips_per_video=5))
    full = plan_clips(64 * 20, SamplingConfig(clip_stride=4))
    assert len(full) == 20 and len(clips) == 5
    assert clips[0].frame_indices == full[0].frame_indices
    assert clips[-1].frame_indices == full[-1].frame_indices
    assert [c.clip_index for c in clips] == list(range(5))
    assert [c.frame_indices[0] // 64 for c in clips] == [0, 5, 10, 14, 19]
    assert cap_clips(full, 1) == [full[0]]
    assert cap_clips(full, 50) == full


def test_plan_is_deterministic() -> None:
    cfg = SamplingConfig(strategy="ssv2", temporal_views=3, spatial_crops=3, max_clips_per_video=4)
    assert plan_clips(333, cfg) == plan_clips(333, cfg)


def test_clip_times() -> None:
    spec = ClipSpec(0, (10, 20, 30))
    assert clip_times(spec, {10: 1.0, 30: 3.0}, 10.0) == (1.0, 3.1)
    assert clip_times(spec, {}, 10.0) == (1.0, 3.1)
    assert clip_times(spec, {}, 0.0) == (0.0, 0.0)
