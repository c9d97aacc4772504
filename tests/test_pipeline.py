"""End to end on a real local Ray: real videos in, real Parquet out, read back by three engines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.helpers import small_job_config, table_hashes, videos_by_name
from videoindex import plan
from videoindex.config import DecodeConfig, ExecutionConfig, InputConfig, SamplingConfig, load_config
from videoindex.extract import ExtractRequest, ExtractSettings, extract_task
from videoindex.jobfile import JobMismatchError
from videoindex.memory import DECODE_WORKER_ENV
from videoindex.preprocess import PreprocessSpec
from videoindex.runner import (
    EXIT_VIDEOS_FAILED,
    decode_task_options,
    ray_system_config,
    run_job,
    warm_decode_workers,
    warn_cold_starts,
)
from videoindex.sampling import plan_clips
from videoindex.schema import VIDEOS_SCHEMA, clips_schema
from videoindex.status import job_status


@pytest.fixture()
def messy_input(sample_videos: Path) -> Path:
    """Two real videos, an empty file, a text file named .mp4, random bytes."""
    folder = sample_videos
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is not a video\n" * 50)
    (folder / "noise.mkv").write_bytes(bytes(range(256)) * 64)
    return folder


def test_index_folder_end_to_end(ray_session, tiny_model_dir, messy_input, tmp_path):
    output = tmp_path / "out"
    config = small_job_config(str(messy_input), output, tiny_model_dir)
    result = run_job(config)
    assert result.exit_code == EXIT_VIDEOS_FAILED  # some videos failed, the job finished
    assert result.summary["shards_committed"] == 3

    by_name = videos_by_name(output)
    assert sorted(by_name) == ["carphone_pristine.mp4", "demo.mp4", "empty.mp4", "noise.mkv", "notes.mp4"]
    assert by_name["empty.mp4"]["error_type"] == "empty_file"
    assert by_name["notes.mp4"]["error_type"] == "not_a_video"
    assert by_name["noise.mkv"]["error_type"] == "not_a_video"
    for bad in ("empty.mp4", "notes.mp4", "noise.mkv"):
        assert by_name[bad]["status"] == "error" and by_name[bad]["error_message"]
        assert by_name[bad]["num_clips"] == 0

    clips = ds.dataset(output / "clips", partitioning="hive").to_table()
    for name, frames in (("demo.mp4", 280), ("carphone_pristine.mp4", 120)):
        video = by_name[name]
        assert video["status"] == "ok" and video["frames"] == frames and video["decoder"] == "decord"
        expected = plan_clips(frames, config.sampling, 16)
        rows = [c for c in clips.to_pylist() if c["video_id"] == video["video_id"]]
        assert video["num_clips"] == len(rows) == len(expected)
        assert [r["frame_indices"] for r in rows] == [list(c.frame_indices) for c in expected]
        for row in rows:
            assert row["start_s"] == pytest.approx(row["frame_indices"][0] / video["fps"], abs=1e-3)
            assert row["topk_labels"][0] == row["label"] and row["topk_scores"][0] == pytest.approx(
                row["score"]
            )
            assert len(row["logits"]) == 7 and len(row["embedding"]) == 32
        assert video["label"] in {f"label_{i}" for i in range(7)}


def test_schema_metadata_and_three_readers(ray_session, tiny_model_dir, sample_videos, tmp_path):
    output = tmp_path / "out"
    assert run_job(small_job_config(str(sample_videos), output, tiny_model_dir)).exit_code == 0
    clip_file = next((output / "clips").rglob("*.parquet"))
    schema = pq.read_schema(clip_file)
    assert schema.remove_metadata().equals(clips_schema(7, 32))
    meta = schema.metadata
    assert json.loads(meta[b"videoindex.label_map"])["3"] == "label_3"
    assert meta[b"videoindex.model"].decode() == str(tiny_model_dir)
    assert (
        pq.read_schema(next((output / "videos").rglob("*.parquet"))).remove_metadata().equals(VIDEOS_SCHEMA)
    )

    arrow = ds.dataset(output / "clips", partitioning="hive").to_table()
    assert arrow.schema.field("shard").type.bit_width >= 32
    duck = duckdb.sql(
        f"select count(*), count(distinct video_id) from read_parquet('{output}/clips/*/*.parquet', hive_partitioning=true)"
    ).fetchall()[0]
    polars = (
        pl.scan_parquet(f"{output}/clips/**/*.parquet", hive_partitioning=True)
        .select(pl.len())
        .collect()
        .item()
    )
    assert duck == (arrow.num_rows, 2) and polars == arrow.num_rows

    job = json.loads((output / "_job.json").read_text())
    assert job["model"]["random_weights"] is False and job["model"]["weights_sha256"]
    assert job["model"]["id2label"]["0"] == "label_0"
    assert job["config"]["sampling"]["strategy"] == "sliding"
    status = job_status(str(output))
    assert status["shards"]["committed"] == status["shards"]["total"] == 1
    assert status["clips"] == arrow.num_rows
    (stats_file,) = (output / "_ledger" / "committed").glob("*.json")
    stats = json.loads(stats_file.read_text())
    assert stats["decode_tasks"] == 2  # one chunk per video (a chunk is up to 16 clips)
    assert 0 <= stats["decode_cold_starts"] <= stats["decode_tasks"]


def test_rerun_is_byte_identical_and_other_settings_refused(
    ray_session, tiny_model_dir, sample_videos, tmp_path
):
    output = tmp_path / "out"
    run_job(small_job_config(str(sample_videos), output, tiny_model_dir))
    first = table_hashes(output)
    assert len(first) == 3
    again = run_job(
        small_job_config(str(sample_videos), output, tiny_model_dir, **{"execution.actors": 2}), rerun=True
    )
    assert again.summary["shards_to_run"] == 1
    assert table_hashes(output) == first

    other = tmp_path / "other"
    run_job(small_job_config(str(sample_videos), other, tiny_model_dir))
    assert table_hashes(other) == first  # same input, same settings, another output: same bytes

    with pytest.raises(JobMismatchError, match="sampling"):
        run_job(small_job_config(str(sample_videos), output, tiny_model_dir, **{"sampling.clip_stride": 2}))


def test_missing_file_in_manifest_is_a_row(ray_session, tiny_model_dir, sample_videos, tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{sample_videos}/demo.mp4\n{sample_videos}/gone.mp4\n")
    output = tmp_path / "out"
    result = run_job(small_job_config(str(manifest), output, tiny_model_dir))
    assert result.exit_code == EXIT_VIDEOS_FAILED
    videos = videos_by_name(output)
    assert videos["gone.mp4"]["error_type"] == "not_found"
    assert "gone.mp4" in videos["gone.mp4"]["error_message"]
    assert videos["demo.mp4"]["status"] == "ok"


def test_tables_match_plain_transformers_path(ray_session, sample_videos, tmp_path):
    """Clips written by a full job (full-size architecture, seeded random weights) agree with the
    model-card path on the same frames: PIL image processor with the checkpoint's mean/std + model."""
    import decord
    import numpy as np
    import torch
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

    from videoindex.config import ModelConfig, PreprocessConfig
    from videoindex.model import VideoClassifier, resolve_model

    output = tmp_path / "out"
    config = load_config(
        None,
        {"input.uri": str(sample_videos), "output.uri": str(output), "model.random_weights": True,
         "sampling.max_clips_per_video": 3, "execution.batch_size": 3, "execution.progress": False,
         "execution.actor_num_cpus": 1, "execution.decode_num_cpus": 0.5, "execution.torch_threads": 2},
    )  # fmt: skip
    assert run_job(config).exit_code == 0
    clips = ds.dataset(output / "clips", partitioning="hive").to_table().to_pylist()
    assert len(clips) == 2 + 3 and all(
        "RANDOM WEIGHTS" in c["model"] for c in clips
    )  # carphone: 120 frames, 2 clips

    cfg = ModelConfig(random_weights=True)
    model = VideoClassifier(resolve_model(cfg, PreprocessConfig()), cfg).model
    spec_mean, spec_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = VideoMAEImageProcessorPil(image_mean=spec_mean, image_std=spec_std)
    cosines, agree = [], []
    for clip in clips:
        reader = decord.VideoReader(clip["uri"].removeprefix("file://"))
        frames = reader.get_batch(clip["frame_indices"]).asnumpy()
        del reader
        pixel_values = processor(list(frames), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            seq = model.videomae(pixel_values).last_hidden_state
            emb = model.fc_norm(seq.mean(1))
            logits = model.classifier(emb)
        ours = torch.tensor(clip["embedding"])[None]
        cosines.append(float(torch.nn.functional.cosine_similarity(ours, emb)[0]))
        agree.append(int(logits.argmax(1)[0]) == clip["label_id"])
        np.testing.assert_allclose(clip["logits"], logits[0].numpy(), atol=0.05)
    print(f"\nmin cosine {min(cosines):.6f}, top-1 agreement {np.mean(agree):.0%} over {len(clips)} clips")
    assert min(cosines) >= 0.999
    assert np.mean(agree) >= 0.95


def test_split_is_checked_against_the_running_cluster(ray_session, tiny_model_dir, sample_videos, tmp_path):
    """run_job reads the live cluster's resources (2 CPUs, no GPU here) before starting any actor."""
    from videoindex.config import ConfigError

    config = small_job_config(
        str(sample_videos), tmp_path / "out", tiny_model_dir, **{"execution.actor_num_gpus": 1}
    )
    with pytest.raises(ConfigError, match="GPUs but the cluster has 0"):
        run_job(config)


@pytest.mark.skipif(any(k in os.environ for k in DECODE_WORKER_ENV), reason="the control needs it unset")
def test_decode_tasks_run_with_the_decode_worker_env(ray_session):
    """Ray starts decode workers with DECODE_WORKER_ENV (glibc reads it only at process start); other
    workers, like the control task here, keep the node's environment."""

    def worker_env() -> dict[str, str | None]:
        return {key: os.environ.get(key) for key in DECODE_WORKER_ENV}

    probe = ray_session.remote(worker_env)
    assert ray_session.get(probe.remote(), timeout=120) == dict.fromkeys(DECODE_WORKER_ENV)
    decode_probe = probe.options(**decode_task_options(ExecutionConfig()))
    assert ray_session.get(decode_probe.remote(), timeout=120) == DECODE_WORKER_ENV


def test_failing_shard_gets_max_attempts_in_every_run(ray_session, tiny_model_dir, sample_videos, tmp_path):
    """A crash between writing the plan and _job.json leaves a lone _plan/: a new run takes the output.
    A shard that keeps failing gets execution.max_attempts tries per run, then commits once repaired."""
    from videoindex import storage
    from videoindex.ledger import Ledger

    output = tmp_path / "out"
    (output / "_plan").mkdir(parents=True)
    (output / "_plan" / "plan.parquet").write_bytes(b"half a plan from a killed driver")
    config = small_job_config(str(sample_videos), output, tiny_model_dir, **{"execution.max_attempts": 2})
    assert run_job(config).exit_code == 0
    clean = table_hashes(output)

    ledger = Ledger(*storage.filesystem(str(output)))
    ledger.uncommit(0)
    partition = output / "clips" / "shard=00000"
    shutil.rmtree(partition)
    partition.write_text("")  # a file where the shard's folder goes: its files can no longer be written
    for run in (1, 2):
        result = run_job(config, resume=True)
        assert result.exit_code == 2 and 0 in result.summary["failed_shards"]
        failed = [a for a in ledger.attempt_records() if a.get("event") == "failed"]
        assert len(failed) == 2 * run, failed  # two tries in each run, not one after the first run
    partition.unlink()
    assert run_job(config, resume=True).exit_code == 0
    assert table_hashes(output) == clean
    assert not list(output.rglob(".*.tmp-*"))


IDLE_GAP_S = 2.5  # longer than Ray's idle_worker_killing_time_threshold_ms (1 s) plus its 0.2 s check period


def _decode_after_idle_gaps(video: plan.VideoTask) -> list[bool]:
    """Warm one decode worker, then run three decode tasks, each after the workers sat idle IDLE_GAP_S;
    returns whether each task started a new worker process."""
    import ray

    settings = ExtractSettings(sampling=SamplingConfig(), decode=DecodeConfig(), preprocess=PreprocessSpec())
    execution = ExecutionConfig()
    ray.get(warm_decode_workers(execution, 1))
    task = ray.remote(extract_task).options(**decode_task_options(execution))
    starts = []
    for _ in range(3):
        time.sleep(IDLE_GAP_S)
        result = ray.get(task.remote(ExtractRequest(video=video), settings))
        assert result.error is None and len(result.clips) > 0
        starts.append(result.cold_start)
    return starts


def _cold_starts_beside_a_model_actor(ray, folder: Path) -> list[bool]:
    """The decode tasks are submitted, as in a job, by an actor holding the CPUs a model actor takes on a
    2-CPU node (all but two decode slots): Ray then keeps no idle worker by default."""
    video = plan.shard_tasks(plan.make_plan(plan.list_inputs(InputConfig(uri=str(folder))), 10))[0]
    owner = ray.remote(num_cpus=2 - 2 * ExecutionConfig().decode_num_cpus)(_decode_after_idle_gaps)
    return ray.get(owner.remote(video), timeout=120)


def test_decode_workers_outlive_idle_gaps(ray_session, sample_videos):
    """A decode worker idles while the model works through the chunk it decoded. With the system config
    videoindex starts a local Ray with (RAY_SYSTEM_CONFIG), the warmed worker runs every task."""
    assert _cold_starts_beside_a_model_actor(ray_session, sample_videos) == [False, False, False]


@pytest.mark.slow  # a Ray of its own (about 40 s); the test above fails the same way without the config
def test_default_ray_restarts_idle_decode_workers(sample_videos):
    """The control: a local Ray with Ray's defaults kills the idle decode worker, so a task after an idle
    gap starts a new worker process (and pays its imports)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False
    )
    try:
        assert _cold_starts_beside_a_model_actor(ray, sample_videos) == [True, True, True]
    finally:
        ray.shutdown()  # the next ray_session user starts the shared Ray again


def _extract_and_tell_policy(request: ExtractRequest, settings: ExtractSettings) -> tuple[bool, int]:
    result = extract_task(request, settings)
    return result.error is None and len(result.clips) > 0, os.sched_getscheduler(0)


@pytest.mark.parametrize("idle", [True, False])
def test_decode_tasks_run_at_the_priority_their_options_ask(ray_session, sample_videos, idle):
    """A CPU job's decode workers run at idle priority (they never preempt the model's threads); others
    keep the policy their worker started with, in workers of their own (the options differ in the
    runtime_env). That policy was SCHED_OTHER in every local run and SCHED_FIFO once in a CI run: what
    matters here is that it is not SCHED_IDLE."""
    video = plan.shard_tasks(plan.make_plan(plan.list_inputs(InputConfig(uri=str(sample_videos))), 10))[0]
    settings = ExtractSettings(sampling=SamplingConfig(), decode=DecodeConfig(), preprocess=PreprocessSpec())
    options = decode_task_options(ExecutionConfig(), idle_priority=idle)
    task = ray_session.remote(_extract_and_tell_policy).options(**options)
    decoded, policy = ray_session.get(task.remote(ExtractRequest(video=video), settings), timeout=120)
    assert decoded
    assert (policy == os.SCHED_IDLE) is idle, policy


def _ray_worker_pids() -> set[int]:
    import psutil

    pids = set()
    for proc in psutil.process_iter():
        try:
            if (
                proc.cmdline()[:1]
                and proc.cmdline()[0].startswith("ray::")
                and "Agent" not in proc.cmdline()[0]
            ):
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


def _queued_decode_tasks(tasks: int) -> list[int]:
    """Submit ``tasks`` decode-pool tasks at once from an actor, as a shard's decode window does."""
    import ray

    task = ray.remote(_hold_and_tell_pid).options(**decode_task_options(ExecutionConfig()))
    return ray.get([task.remote() for _ in range(tasks)])


def _hold_and_tell_pid() -> int:
    time.sleep(0.5)
    return os.getpid()


def _extra_workers_for_queued_tasks(ray) -> int:
    """Worker processes Ray starts, beyond the ones that run them, for decode tasks queued behind busy
    CPUs. As in a job: a 1.5-CPU owner (the model actor) on a 2-CPU node leaves two decode slots, both
    warmed once it holds its CPUs; then it queues four tasks at once."""
    execution = ExecutionConfig()
    before = _ray_worker_pids()
    owner = ray.remote(num_cpus=2 - 2 * execution.decode_num_cpus)(_Owner).remote()
    owner_pid = ray.get(owner.pid.remote(), timeout=60)
    warm = set(ray.get(warm_decode_workers(execution, 2)))
    ran = ray.get(owner.queue_tasks.remote(4), timeout=120)
    time.sleep(2.0)  # a worker Ray started for the queue registers and idles within about a second
    extra = _ray_worker_pids() - before - warm - set(ran) - {owner_pid}
    ray.kill(owner)
    return len(extra)


class _Owner:
    def pid(self) -> int:
        return os.getpid()

    def queue_tasks(self, tasks: int) -> list[int]:
        return _queued_decode_tasks(tasks)


def _on_a_fresh_ray(system_config: dict, measure):
    """A Ray of its own: idle workers other tests left in the shared one change what Ray starts."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, _system_config=system_config)  # fmt: skip
    try:
        return measure(ray)
    finally:
        ray.shutdown()  # the next ray_session user starts the shared Ray again


def test_queued_decode_tasks_start_no_extra_workers():
    """Each extra worker would idle all job long, waking 100 times a second beside the model."""
    assert _on_a_fresh_ray(ray_system_config(), _extra_workers_for_queued_tasks) == 0


@pytest.mark.slow  # a Ray of its own (about 20 s)
def test_raised_soft_limit_starts_extra_workers_for_queued_tasks():
    """The control: keeping idle workers with a raised num_workers_soft_limit instead (the earlier
    setting) makes Ray start workers for the queued tasks."""
    config = {**ray_system_config(), "num_workers_soft_limit": 1024}
    del config["idle_worker_killing_time_threshold_ms"]
    assert _on_a_fresh_ray(config, _extra_workers_for_queued_tasks) >= 1


def test_cold_start_warning(caplog):
    """Most tasks on new workers means Ray is killing idle decode workers: the log says what to set."""
    with caplog.at_level(logging.WARNING, logger="videoindex.runner"):
        assert not warn_cold_starts(3, tasks=40, cold_starts=2)
        assert not caplog.records
        assert warn_cold_starts(3, tasks=40, cold_starts=30)
    (record,) = caplog.records
    assert "[shard 00003] 30 of 40" in record.getMessage()
    assert "RAY_idle_worker_killing_time_threshold_ms=600000" in record.getMessage()
