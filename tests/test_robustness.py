"""Robustness: every awkward input is exactly one videos row with a precise error, memory stays bounded.

The job test runs the whole zoo of ``videogen.make_bad_inputs`` (plus a decode that blows up memory) as
one job with the local executor (decode worker processes). The other tests run the decode stage in this
process: the memory cap, decord's reads of huge frames, and long videos decoded chunk by chunk.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.videogen import decode_index, make_bad_inputs, write_index_video
from videoindex.config import DecodeConfig, SamplingConfig, load_config
from videoindex.format.errortypes import ERROR_TYPES
from videoindex.format.plans import VideoTask
from videoindex.job.run import EXIT_VIDEOS_FAILED, run_job
from videoindex.stages.decode import (
    ClipBatch,
    DecodeSettings,
    VideoEnd,
    VideoFailure,
    VideoPlan,
    decode_video,
)
from videoindex.stages.plan import video_id
from videoindex.stages.preprocess import PreprocessSpec
from videoindex.stages.sampling import plan_clips
from videoindex.stages.video import Frame, VideoReader, open_video

HUNGRY = "tests.test_robustness:open_hungry"
COUNTING = "tests.test_robustness:open_counting"
HOG_NAME = "memory_hog.mp4"
HOG_LIMIT_MB = 2048  # the hog stops here: without a working cap the test fails instead of eating the node
JOB_MEMORY_MB = 1024

# Specific words each error message must hold, besides the file's name.
MESSAGE_WORDS = {
    "empty_file": "0 bytes",
    "not_a_video": "failed at open",
    "no_video_stream": "no video stream",
    "not_found": "No such file",
    "out_of_memory": "MemoryError",
}


class _Wrapped(VideoReader):
    def __init__(self, inner: VideoReader) -> None:
        self.inner, self.meta, self.size_bytes = inner, inner.meta, inner.size_bytes

    @property
    def fallback(self) -> Any:  # type: ignore[override]
        return self.inner.fallback

    def close(self) -> None:
        self.inner.close()


class _HungryReader(_Wrapped):
    """A reader that allocates 64 MiB blocks, held, until HOG_LIMIT_MB or a MemoryError, before its frames."""

    def frames(self, indices: Sequence[int], size: tuple[int, int] | None) -> Iterator[Frame]:
        held = [np.ones(64 * 2**20, np.uint8) for _ in range(HOG_LIMIT_MB // 64)]
        del held
        yield from self.inner.frames(indices, size)


def open_hungry(path: str, *, decoder: str, fs: Any, fallback_to_pyav: bool) -> VideoReader:
    """Decoder plug-in: decord (with its PyAV fallback, so the job test sees fallback rows), except that
    files named memory_hog*.mp4 blow up memory."""
    reader = open_video(path, decoder="decord", fs=fs, fallback_to_pyav=fallback_to_pyav)
    return _HungryReader(reader) if Path(path).name == HOG_NAME else reader


YIELDED: list[int] = []  # frames handed out by the last open_counting reader, in order


class _CountingReader(_Wrapped):
    def frames(self, indices: Sequence[int], size: tuple[int, int] | None) -> Iterator[Frame]:
        YIELDED.clear()
        for frame in self.inner.frames(indices, size):
            YIELDED.append(frame[0])
            yield frame


def open_counting(path: str, *, decoder: str, fs: Any, fallback_to_pyav: bool) -> VideoReader:
    """Decoder plug-in that records which frames the decoder handed out, and when."""
    return _CountingReader(open_video(path, decoder="pyav", fs=fs, fallback_to_pyav=fallback_to_pyav))


def _settings(decoder: str = "pyav", *, max_memory_mb: int = 4096, chunk_clips: int = 4, **sampling: Any
              ) -> DecodeSettings:  # fmt: skip
    return DecodeSettings(
        sampling=SamplingConfig(**sampling),
        decode=DecodeConfig(decoder=decoder, max_memory_mb=max_memory_mb, chunk_clips=chunk_clips),
        preprocess=PreprocessSpec(resize_short_side=32, crop_size=32),
    )


def _task(path: Path) -> VideoTask:
    uri = str(path)
    return VideoTask(uri, video_id(uri), None, None, None, 0)


def test_memory_blowup_is_out_of_memory_and_the_process_lives_on(tmp_path: Path) -> None:
    before = resource.getrlimit(resource.RLIMIT_DATA)
    hog = write_index_video(tmp_path / HOG_NAME, frames=20)
    events = list(decode_video(_task(hog), _settings(HUNGRY, max_memory_mb=256)))
    assert [type(e) for e in events] == [VideoPlan, VideoFailure]
    error = events[-1].error
    assert error.error_type == "out_of_memory" and "MemoryError" in str(error), error
    assert resource.getrlimit(resource.RLIMIT_DATA) == before  # the cap is lifted after the decode
    fine = write_index_video(tmp_path / "fine.mp4", frames=20)
    events = list(decode_video(_task(fine), _settings(HUNGRY, max_memory_mb=256)))
    assert [type(e) for e in events] == [VideoPlan, ClipBatch, VideoEnd]
    assert events[1].frames.shape == (1, 16, 32, 32, 3)


def test_huge_frames_past_the_cap_are_refused_before_decord_aborts(tmp_path: Path) -> None:
    """decord kills the process on a failed allocation; its reads are checked against the cap first."""
    video = write_index_video(tmp_path / "uhd.mp4", frames=3, size=(3840, 2160))
    last = list(decode_video(_task(video), _settings("decord", max_memory_mb=200)))[-1]
    assert isinstance(last, VideoFailure) and last.error.error_type == "out_of_memory"
    assert "3840x2160" in str(last.error) and "decode.max_memory_mb" in str(last.error)
    last = list(decode_video(_task(video), _settings("decord", max_memory_mb=1024)))[-1]
    assert isinstance(last, VideoEnd) and last.meta.width == 3840
    last = list(decode_video(_task(video), _settings("pyav", max_memory_mb=200)))[-1]
    assert isinstance(last, VideoEnd)  # PyAV never makes a full-resolution RGB frame


@pytest.mark.parametrize("chunk_clips", [4, 16])
def test_long_video_is_decoded_chunk_by_chunk(tmp_path: Path, chunk_clips: int) -> None:
    """A 2-minute video with max_clips_per_video: one pass, each chunk cut as soon as its frames are in
    (the decoder never runs ahead of the chunk being cut), clips spread over the whole video."""
    video = write_index_video(tmp_path / "long.mp4", frames=3000, fps=25, size=(32, 32))
    settings = _settings(COUNTING, chunk_clips=chunk_clips, max_clips_per_video=10)
    events, seen = [], []
    for event in decode_video(_task(video), settings):
        events.append(event)
        seen.append(len(YIELDED))
    plan, batches, end = events[0], events[1:-1], events[-1]
    assert isinstance(plan, VideoPlan) and plan.meta.frames == 3000 and len(plan.clips) == 10
    assert isinstance(end, VideoEnd) and all(isinstance(b, ClipBatch) for b in batches)
    sizes = [4, 4, 2] if chunk_clips == 4 else [10]
    assert [len(b.clips) for b in batches] == sizes
    assert [c.clip_index for b in batches for c in b.clips] == list(range(10))
    for batch, handed_out in zip(batches, seen[1:-1], strict=True):
        last_needed = max(i for c in batch.clips for i in c.frame_indices)
        assert YIELDED[handed_out - 1] == last_needed  # not one frame past the chunk
        for clip, frames in zip(batch.clips, batch.frames, strict=True):
            assert [decode_index(f) for f in frames] == list(clip.frame_indices)
    starts = [t[0] for b in batches for t in b.times_s]
    assert starts[0] == 0.0 and starts[-1] > 60.0  # the clips spread over the whole video
    assert len(YIELDED) == 160  # 16 distinct frames per clip, never the whole video


def test_every_input_is_one_row_with_a_precise_error(tiny_model_dir: Path, tmp_path: Path):
    folder = tmp_path / "messy"
    expected = make_bad_inputs(folder)
    write_index_video(folder / HOG_NAME, frames=20)
    expected[HOG_NAME] = "out_of_memory"
    output = tmp_path / "out"
    config = load_config(None, {
        "input.uri": str(folder), "output.uri": str(output), "model.name": str(tiny_model_dir),
        "output.shard_size": 8, "execution.batch_size": 4, "execution.executor": "local",
        "execution.progress": False, "sampling.clip_stride": 1,
        "decode.chunk_clips": 1, "decode.decoder": HUNGRY, "decode.max_memory_mb": JOB_MEMORY_MB,
    })  # fmt: skip
    result = run_job(config)
    assert result.exit_code == EXIT_VIDEOS_FAILED, result.summary

    rows = ds.dataset(output / "videos", partitioning="hive").to_table().to_pylist()
    names = [Path(r["uri"]).name for r in rows]
    missing, extra = set(expected) - set(names), [n for n in names if names.count(n) > 1 or n not in expected]
    assert not missing and not extra, f"one videos row per input: missing {missing}, unexpected {extra}"
    by_name = dict(zip(names, rows, strict=True))
    clips = ds.dataset(output / "clips", partitioning="hive").to_table(columns=["video_id", "clip_index"])
    clips_of: dict[str, list[int]] = {}
    for clip in clips.to_pylist():
        clips_of.setdefault(clip["video_id"], []).append(clip["clip_index"])
    for name, outcome in expected.items():
        row = by_name[name]
        if outcome.startswith("ok:"):
            assert row["status"] == "ok" and row["error_type"] is None, (name, row["error_message"])
            want = len(plan_clips(row["frames"], config.sampling, 16))
            assert row["num_clips"] == want and sorted(clips_of[row["video_id"]]) == list(range(want)), name
        else:
            assert (row["status"], row["error_type"]) == ("error", outcome), (name, row["error_message"])
            assert row["error_type"] in ERROR_TYPES and row["num_clips"] == 0
            assert name in row["error_message"] and MESSAGE_WORDS.get(outcome, "") in row["error_message"]
            assert row["video_id"] not in clips_of
    assert by_name["uhd_4k.mp4"]["width"] == 3840 and by_name["twelve_frames.mp4"]["frames"] == 12
    rotated = by_name["rotated_90.mp4"]
    assert (rotated["width"], rotated["height"], rotated["rotation"]) == (64, 48, 270)  # upright
    assert by_name["vfr.mp4"]["num_clips"] == 2 and by_name["truncated_faststart.mp4"]["num_clips"] == 2

    # decord cannot read these; PyAV made the clips, and the errors table keeps decord's reason.
    fallbacks = {"av1.mp4": "unsupported_codec", "still_image.mp4": "not_a_video", "tiny_16x16.mp4": None}
    errors = ds.dataset(output / "errors", partitioning="hive").to_table().to_pylist()
    for name, error_type in fallbacks.items():
        assert by_name[name]["decoder"] == "pyav", name
        recovered = [e for e in errors if Path(e["uri"]).name == name]
        assert recovered and all(not e["fatal"] and e["decoder"] == "decord" for e in recovered), name
        assert error_type is None or recovered[0]["error_type"] == error_type
    assert by_name["ten_bit.mp4"]["decoder"] == "decord" and by_name["gray.mkv"]["decoder"] == "decord"
    fatal = sorted(Path(e["uri"]).name for e in errors if e["fatal"])
    assert fatal == sorted(n for n, o in expected.items() if not o.startswith("ok:"))
