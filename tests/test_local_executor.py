"""The local executor: no Ray at all, and the decode worker processes keep Ray's isolation semantics
(a hung decode is killed after decode.timeout_s, a crashing decoder costs only its video, retried first)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES
from tests.helpers import small_job_config, table_hashes, videos_by_name
from videoindex.job.run import EXIT_OK, EXIT_VIDEOS_FAILED, run_job

DECODER = "tests.faulty_decoder:open_faulty"


@pytest.fixture()
def four_videos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"video-{i}.mp4").write_bytes((SAMPLES / "carphone_pristine.mp4").read_bytes())
    return folder


def test_a_local_job_starts_no_ray(tiny_model_dir: Path, sample_videos: Path, tmp_path: Path) -> None:
    """The whole job in a fresh interpreter: Ray is never imported, so no Ray process can start."""
    script = (
        "import sys\n"
        "from tests.helpers import small_job_config\n"
        "from videoindex.job.run import run_job\n"
        f"result = run_job(small_job_config({str(sample_videos)!r}, {str(tmp_path / 'out')!r}, "
        f"{str(tiny_model_dir)!r}))\n"
        "print('exit', result.exit_code, 'ray imported', 'ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exit 0 ray imported False" in done.stdout
    assert len(table_hashes(tmp_path / "out")) == 3


def test_hung_and_crashing_decoders_cost_only_their_videos(tiny_model_dir: Path, four_videos: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    clean_out, out = tmp_path / "clean", tmp_path / "out"
    config = small_job_config(four_videos, out, tiny_model_dir, **{"decode.decoder": DECODER,
                              "decode.timeout_s": 4, "output.shard_size": 4})  # fmt: skip
    assert (
        run_job(
            small_job_config(four_videos, clean_out, tiny_model_dir, **{"output.shard_size": 4})
        ).exit_code
        == 0
    )
    hang, crash = four_videos / "video-1.mp4.hang", four_videos / "video-2.mp4.crash"
    hang.write_text("")
    crash.write_text("")
    try:
        result = run_job(config)
    finally:
        hang.unlink()
        crash.unlink()
    assert result.exit_code == EXIT_VIDEOS_FAILED
    videos = videos_by_name(out)
    assert videos["video-1.mp4"]["error_type"] == "timeout"
    assert "longer than 4 s" in videos["video-1.mp4"]["error_message"]
    assert videos["video-2.mp4"]["error_type"] == "decoder_crash"
    assert "exit code 13" in videos["video-2.mp4"]["error_message"]  # os._exit(13) in the faulty decoder
    assert "on 3 tries" in videos["video-2.mp4"]["error_message"]  # retried twice, as Ray does
    assert {videos[f"video-{i}.mp4"]["status"] for i in (0, 3)} == {"ok"}

    # the "repaired" videos index now (the timeout is no output setting: a generous one for the retry)
    again = run_job(config.replace(decode=dataclasses.replace(config.decode, timeout_s=300)), resume=True,
                    retry_failed=True)  # fmt: skip
    assert again.exit_code == EXIT_OK
    assert table_hashes(out) == table_hashes(clean_out)


@pytest.mark.parametrize("idle", [True, False])
def test_local_decode_workers_run_at_the_priority_asked(sample_videos: Path, idle: bool) -> None:
    """A CPU job's decode processes run at idle priority (they never preempt the model's threads), others
    at the priority they started with; the tests' jobs ask for normal priority (tests/helpers.py)."""
    from videoindex.config import DecodeConfig, InputConfig, SamplingConfig
    from videoindex.executors.local import LocalDecodePool
    from videoindex.format.plans import shard_tasks
    from videoindex.stages import plan
    from videoindex.stages.decode import DecodeSettings
    from videoindex.stages.preprocess import PreprocessSpec

    video = shard_tasks(plan.make_plan(plan.list_inputs(InputConfig(uri=str(sample_videos))), 10))[0]
    settings = DecodeSettings(sampling=SamplingConfig(), decode=DecodeConfig(scale="swscale"),
                              preprocess=PreprocessSpec())  # fmt: skip
    pool = LocalDecodePool(settings, workers=1, timeout_s=120, idle_priority=idle)
    try:
        assert list(pool([video]))  # decoded; the worker is back in the pool
        (worker,) = pool.idle
        assert (os.sched_getscheduler(worker.process.pid) == os.SCHED_IDLE) is idle
    finally:
        pool.close()
