"""Robustness: every awkward input is exactly one videos row with a precise error, memory stays bounded.

The job test runs the whole zoo of ``videogen.make_bad_inputs`` (plus a decode that blows up memory) as
one job on a real local Ray. The other tests run ``extract`` in this process: the memory cap, the
bounded reads of huge frames, and long videos decoded chunk by chunk with ``max_clips_per_video``.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.videogen import make_bad_inputs, write_index_video
from videoindex.config import DecodeConfig, SamplingConfig, load_config
from videoindex.decode import VideoReader, open_video
from videoindex.errors import ERROR_TYPES
from videoindex.extract import ExtractRequest, ExtractSettings, extract, follow_up_requests, read_groups
from videoindex.plan import VideoTask, video_id
from videoindex.preprocess import PreprocessSpec
from videoindex.runner import EXIT_VIDEOS_FAILED, run_job
from videoindex.sampling import ClipSpec, plan_clips

HUNGRY = "tests.test_robustness:open_hungry"
RECORDING = "tests.test_robustness:open_recording"
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


class _HungryReader(VideoReader):
    """A reader whose read() allocates 64 MiB blocks, held, until HOG_LIMIT_MB or a MemoryError."""

    def __init__(self, inner: VideoReader) -> None:
        self.inner, self.meta = inner, inner.meta

    def read(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        held = [np.ones(64 * 2**20, np.uint8) for _ in range(HOG_LIMIT_MB // 64)]
        del held
        return self.inner.read(indices)

    def close(self) -> None:
        self.inner.close()


def open_hungry(path: str, *, decoder: str, fs: Any, fallback_to_pyav: bool) -> VideoReader:
    """Decoder plug-in: the real decoder, except that files named memory_hog*.mp4 blow up memory."""
    reader = open_video(path, decoder=decoder, fs=fs, fallback_to_pyav=fallback_to_pyav)
    return _HungryReader(reader) if Path(path).name == HOG_NAME else reader


READS: list[int] = []  # frames per read() call, in this process (open_recording)


class _RecordingReader(VideoReader):
    def __init__(self, inner: VideoReader) -> None:
        self.inner, self.meta = inner, inner.meta

    def read(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        READS.append(len(indices))
        return self.inner.read(indices)

    def close(self) -> None:
        self.inner.close()


def open_recording(path: str, *, decoder: str, fs: Any, fallback_to_pyav: bool) -> VideoReader:
    """Decoder plug-in that records how many frames each read asks for."""
    return _RecordingReader(open_video(path, decoder=decoder, fs=fs, fallback_to_pyav=fallback_to_pyav))


def _settings(decoder: str = "decord", *, max_memory_mb: int = 4096, **sampling: Any) -> ExtractSettings:
    return ExtractSettings(
        sampling=SamplingConfig(**sampling),
        decode=DecodeConfig(decoder=decoder, max_memory_mb=max_memory_mb, chunk_clips=4),
        preprocess=PreprocessSpec(resize_short_side=32, crop_size=32),
    )


def _request(path: Path) -> ExtractRequest:
    uri = str(path)
    return ExtractRequest(VideoTask(uri, video_id(uri), None, None, None, 0))


def test_memory_blowup_is_out_of_memory_and_the_process_lives_on(tmp_path: Path) -> None:
    before = resource.getrlimit(resource.RLIMIT_DATA)
    hog = write_index_video(tmp_path / HOG_NAME, frames=20)
    result = extract(_request(hog), _settings(HUNGRY, max_memory_mb=256))
    assert result.error is not None and result.error.error_type == "out_of_memory", result.error
    assert "MemoryError" in str(result.error) and result.frames is None
    assert resource.getrlimit(resource.RLIMIT_DATA) == before  # the cap is lifted after the decode
    fine = write_index_video(tmp_path / "fine.mp4", frames=20)
    result = extract(_request(fine), _settings(HUNGRY, max_memory_mb=256))
    assert result.error is None and result.frames.shape == (1, 16, 32, 32, 3)


def test_huge_frames_past_the_cap_are_refused_before_decord_aborts(tmp_path: Path) -> None:
    """decord kills the process on a failed allocation; the read is checked against the cap first."""
    video = write_index_video(tmp_path / "uhd.mp4", frames=3, size=(3840, 2160))
    result = extract(_request(video), _settings("decord", max_memory_mb=200))
    assert result.error is not None and result.error.error_type == "out_of_memory"
    assert "3840x2160" in str(result.error) and "decode.max_memory_mb" in str(result.error)
    result = extract(_request(video), _settings("decord", max_memory_mb=1024))
    assert result.error is None and result.meta.width == 3840


def test_read_groups_bound_full_resolution_frames() -> None:
    clips = tuple(ClipSpec(n, tuple(range(16 * n, 16 * n + 16))) for n in range(5))
    frame = 3840 * 2160 * 3
    groups = read_groups(clips, frame, 40 * frame)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [c for g in groups for c in g] == list(clips)
    assert [len(g) for g in read_groups(clips, frame, frame)] == [1] * 5  # never less than one clip
    shared = tuple(ClipSpec(n, tuple(range(16)), spatial_crop=n) for n in range(3))  # ssv2 crops
    assert [len(g) for g in read_groups(shared, frame, 16 * frame)] == [3]


@pytest.mark.parametrize("decoder", [RECORDING, "pyav"])
def test_long_video_is_decoded_chunk_by_chunk(tmp_path: Path, decoder: str) -> None:
    """A 2-minute video: each task reads only its own chunk's frames; max_clips_per_video caps clips."""
    video = write_index_video(tmp_path / "long.mp4", frames=3000, fps=25, size=(32, 32))
    settings = ExtractSettings(
        sampling=SamplingConfig(max_clips_per_video=10),
        decode=DecodeConfig(decoder=decoder, chunk_clips=4),
        preprocess=PreprocessSpec(resize_short_side=32, crop_size=32),
    )
    READS.clear()
    first = extract(_request(video), settings)
    assert first.error is None and first.meta.frames == 3000
    assert len(first.all_clips) == 10 and len(first.clips) == 4
    results = [first] + [extract(r, settings) for r in follow_up_requests(first, 4)]
    assert [len(r.clips) for r in results] == [4, 4, 2]
    assert [c.clip_index for r in results for c in r.clips] == list(range(10))
    assert all(r.error is None and len(r.frames) == len(r.clips) for r in results)
    if decoder == RECORDING:
        assert READS == [64, 64, 32]  # 16 distinct frames per clip, never the whole video
    starts = [r.times_s[0][0] for r in results]
    assert starts[0] == 0.0 and starts[-1] > 60.0  # the clips spread over the whole video


def test_every_input_is_one_row_with_a_precise_error(ray_session, tiny_model_dir: Path, tmp_path: Path):
    folder = tmp_path / "messy"
    expected = make_bad_inputs(folder)
    write_index_video(folder / HOG_NAME, frames=20)
    expected[HOG_NAME] = "out_of_memory"
    output = tmp_path / "out"
    config = load_config(None, {
        "input.uri": str(folder), "output.uri": str(output), "model.name": str(tiny_model_dir),
        "output.shard_size": 8, "execution.batch_size": 4, "execution.actor_num_cpus": 0.5,
        "execution.decode_num_cpus": 0.5, "execution.progress": False, "sampling.clip_stride": 1,
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


def test_decode_queued_behind_busy_cpus_is_not_a_timeout(
    tiny_model_dir: Path, sample_videos: Path, tmp_path: Path
):
    """The timeout clock starts when Ray runs a decode task: a task that waited for a CPU longer than
    decode.timeout_s (here behind a task holding the CPUs) indexes normally. Needs the dashboard (state API)."""
    import time

    import ray

    from tests.helpers import small_job_config, videos_by_name

    if ray.is_initialized():
        ray.shutdown()
    from videoindex.runner import ray_system_config

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING", log_to_driver=False,
             _system_config=ray_system_config())  # fmt: skip
    try:
        hog = (
            ray.remote(lambda s: time.sleep(s)).options(num_cpus=1).remote(24)
        )  # the actor gets 0.5, decode 0.5
        config = small_job_config(sample_videos, tmp_path / "out", tiny_model_dir, **{
            "decode.timeout_s": 8, "execution.decode_num_cpus": 1, "execution.actors": 1})  # fmt: skip
        result = run_job(config)
        assert ray.get(hog) is None
    finally:
        ray.shutdown()
    videos = videos_by_name(tmp_path / "out")
    assert result.exit_code == 0, {name: v["error_message"] for name, v in videos.items()}
    assert {name: v["status"] for name, v in videos.items()} == {
        "demo.mp4": "ok",
        "carphone_pristine.mp4": "ok",
    }
