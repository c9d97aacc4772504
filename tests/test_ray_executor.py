"""The Ray executor: the same tables as the local executor, and Ray's worker pool kept as a job needs it.

Runs on the session's local Ray (``ray_session``); the fault tests on a multi-node cluster are in
test_faults.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import pytest

from tests.helpers import (
    run_job_in_thread,
    small_job_config,
    table_hashes,
    videos_by_name,
    wait_shard_started,
)
from videoindex.config import DecodeConfig, ExecutionConfig, InputConfig, SamplingConfig
from videoindex.executors.decode_worker import decode_task
from videoindex.executors.ray_executor import (
    decode_slots,
    decode_task_options,
    ray_system_config,
    warm_decode_workers,
    warn_cold_starts,
)
from videoindex.format.plans import VideoTask, shard_tasks
from videoindex.job.run import EXIT_VIDEOS_FAILED, run_job
from videoindex.job.sizing import ExecutionSplit
from videoindex.memory import DECODE_WORKER_ENV
from videoindex.stages import plan
from videoindex.stages.decode import TERMINAL, DecodeSettings, VideoEnd
from videoindex.stages.preprocess import PreprocessSpec

pytestmark = pytest.mark.ray


def test_ray_and_local_executors_write_the_same_bytes(ray_session, tiny_model_dir, sample_videos, tmp_path):
    """Two videos of several chunks each, a bad file, thumbnails: the Ray executor's tables are the
    local executor's, byte for byte, and both count the same videos and clips. With the reference resize
    (torch in the decode workers of both), not the tests' usual swscale."""
    (sample_videos / "notes.mp4").write_text("not a video\n" * 20)
    results, hashes = {}, {}
    for executor in ("ray", "local"):
        output = tmp_path / executor
        config = small_job_config(sample_videos, output, tiny_model_dir, **{
            "execution.executor": executor, "decode.chunk_clips": 2, "sampling.clip_stride": 2,
            "output.thumbnails": True, "decode.scale": "rgb"})  # fmt: skip
        results[executor] = run_job(config)
        hashes[executor] = table_hashes(output)
    assert results["ray"].exit_code == results["local"].exit_code == EXIT_VIDEOS_FAILED
    for key in ("videos", "videos_ok", "videos_error", "clips", "shards_committed"):
        assert results["ray"].summary[key] == results["local"].summary[key], key
    assert results["ray"].summary["clips"] > 10 and len(hashes["ray"]) == 6
    assert hashes["ray"] == hashes["local"]
    assert videos_by_name(tmp_path / "ray")["notes.mp4"]["error_type"] == "not_a_video"


def test_split_is_checked_against_the_running_cluster(ray_session, tiny_model_dir, sample_videos, tmp_path):
    """run_job reads the live cluster's resources (2 CPUs, no GPU here) before starting any actor."""
    from videoindex.config import ConfigError

    config = small_job_config(
        str(sample_videos),
        tmp_path / "out",
        tiny_model_dir,
        **{"execution.actor_num_gpus": 1, "execution.executor": "ray"},
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


IDLE_GAP_S = 2.5  # longer than Ray's idle_worker_killing_time_threshold_ms (1 s) plus its 0.2 s check period


def _decode_after_idle_gaps(video: VideoTask) -> list[bool]:
    """Warm one decode worker (as a job's dispatcher does: with the settings, so it imports torch too),
    then run two decode tasks, each after the workers sat idle IDLE_GAP_S; returns whether each task
    was cold (a new worker process, or one without torch imported yet)."""
    import ray

    settings = DecodeSettings(sampling=SamplingConfig(), decode=DecodeConfig(), preprocess=PreprocessSpec())
    execution = ExecutionConfig()
    ray.get(warm_decode_workers(execution, 1, settings=settings))
    task = ray.remote(_decoded).options(**decode_task_options(execution))
    starts = []
    for _ in range(2):
        time.sleep(IDLE_GAP_S)
        end = ray.get(task.remote(video, settings))
        assert isinstance(end, VideoEnd)
        starts.append(end.cold_start)
    return starts


def _decoded(video: VideoTask, settings: DecodeSettings) -> object:
    """A video's last event, decoded by decode_task in this Ray worker."""
    return [e for e in decode_task(video, settings) if isinstance(e, TERMINAL)][0]


def _cold_starts_beside_a_model_actor(ray, folder: Path) -> list[bool]:
    """The decode tasks are submitted, as in a job, by an actor holding the CPUs a model actor takes on a
    2-CPU node (all but two decode slots): Ray then keeps no idle worker by default."""
    video = shard_tasks(plan.make_plan(plan.list_inputs(InputConfig(uri=str(folder))), 10))[0]
    owner = ray.remote(num_cpus=2 - 2 * ExecutionConfig().decode_num_cpus)(_decode_after_idle_gaps)
    return ray.get(owner.remote(video), timeout=120)


def test_decode_workers_outlive_idle_gaps(ray_session, sample_videos):
    """A decode worker idles while the model works through the chunk it decoded. With the system config
    videoindex starts a local Ray with (RAY_SYSTEM_CONFIG), the warmed worker runs every task."""
    assert _cold_starts_beside_a_model_actor(ray_session, sample_videos) == [False, False]


@pytest.mark.slow  # a Ray of its own (about 40 s); the test above fails the same way without the config
def test_default_ray_restarts_idle_decode_workers(own_ray, sample_videos):
    """The control: a local Ray with Ray's defaults kills the idle decode worker, so a task after an idle
    gap starts a new worker process (and pays its imports)."""
    ray = own_ray(address="local", num_cpus=2, include_dashboard=False)
    assert _cold_starts_beside_a_model_actor(ray, sample_videos) == [True, True]


def _decode_and_tell_policy(video: VideoTask, settings: DecodeSettings) -> tuple[bool, int]:
    return isinstance(_decoded(video, settings), VideoEnd), os.sched_getscheduler(0)


@pytest.mark.parametrize("idle", [True, False])
def test_decode_tasks_run_at_the_priority_their_options_ask(ray_session, sample_videos, idle):
    """A CPU job's decode workers run at idle priority (they never preempt the model's threads); others
    keep the policy their worker started with, in workers of their own (the options differ in the
    runtime_env). That policy was SCHED_OTHER in every local run and SCHED_FIFO once in a CI run: what
    matters here is that it is not SCHED_IDLE."""
    video = shard_tasks(plan.make_plan(plan.list_inputs(InputConfig(uri=str(sample_videos))), 10))[0]
    settings = DecodeSettings(sampling=SamplingConfig(), decode=DecodeConfig(), preprocess=PreprocessSpec())
    options = decode_task_options(ExecutionConfig(), idle_priority=idle)
    task = ray_session.remote(_decode_and_tell_policy).options(**options)
    decoded, policy = ray_session.get(task.remote(video, settings), timeout=120)
    assert decoded
    assert (policy == os.SCHED_IDLE) is idle, policy


def test_decode_queued_behind_busy_cpus_is_not_a_timeout_and_metrics_are_exported(
    ray_session, _ray_owner, tiny_model_dir: Path, sample_videos: Path, tmp_path: Path
):
    """The timeout clock starts when Ray runs a decode task: a task that waited for a CPU longer than
    decode.timeout_s (here behind an actor holding the CPUs it needs, released 6 s after the shard
    started) indexes normally (needs the dashboard: the state API). The actors' metrics reach Ray's
    Prometheus endpoint: clips, videos, latencies."""
    ray, port = ray_session, _ray_owner.metrics_port
    names = ("videoindex_clips", "videoindex_videos", "videoindex_infer_latency_s_count",
             "videoindex_decode_latency_s_count")  # fmt: skip
    before = dict.fromkeys(names, 0.0)  # the shared Ray's earlier jobs counted too
    with contextlib.suppress(OSError):  # no metrics exported yet
        before = {name: _metric_total(_metrics(port), name) for name in names}
    hog = ray.remote(num_cpus=1)(_Owner).remote()  # the model actor gets 0.5 CPU, a decode task needs 1
    ray.get(hog.pid.remote(), timeout=60)
    timeout_s, queued_s = 4, 6
    config = small_job_config(sample_videos, tmp_path / "out", tiny_model_dir, **{
        "execution.executor": "ray", "decode.timeout_s": timeout_s, "execution.decode_num_cpus": 1,
        "execution.actors": 1})  # fmt: skip
    job, box = run_job_in_thread(config)
    try:
        wait_shard_started(tmp_path / "out")  # the shard runs: its decode tasks are queued behind the hog
        time.sleep(queued_s)
    finally:
        ray.kill(hog)  # the shared Ray's CPUs back, whatever happened
    job.join(120)
    result = box["result"]
    videos = videos_by_name(tmp_path / "out")
    assert result.exit_code == 0, {name: v["error_message"] for name, v in videos.items()}
    assert {name: v["status"] for name, v in videos.items()} == {
        "demo.mp4": "ok",
        "carphone_pristine.mp4": "ok",
    }

    def counted() -> dict[str, float] | None:  # each metric is exported on its own: one may come later
        text = _metrics(port)
        added = {name: _metric_total(text, name) - before[name] for name in names}
        done = added["videoindex_clips"] >= result.summary["clips"] and added["videoindex_videos"] >= 2
        return added if done else None

    deadline = time.monotonic() + 60
    while (added := counted()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert added is not None, "the clips and videos counters did not reach the metrics endpoint within 60 s"
    assert added["videoindex_clips"] == result.summary["clips"]
    assert added["videoindex_videos"] == 2
    assert 'status="ok"' in "".join(
        ln for ln in _metrics(port).splitlines() if ln.startswith("ray_videoindex_videos")
    )
    assert added["videoindex_infer_latency_s_count"] >= 1
    assert added["videoindex_decode_latency_s_count"] >= 1


def _ray_worker_pids() -> set[int]:
    """Worker processes of this test's own Ray: children of its raylet, never another Ray's on the machine."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = set()
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            title = proc.cmdline()[:1]
            if title and title[0].startswith("ray::") and "Agent" not in title[0]:
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


def test_queued_decode_tasks_start_no_extra_workers(own_ray):
    """Each extra worker would idle all job long, waking 100 times a second beside the model. A Ray of its
    own: idle workers other tests left in the shared one change what Ray starts."""
    ray = own_ray(address="local", num_cpus=2, include_dashboard=False, _system_config=ray_system_config())
    assert _extra_workers_for_queued_tasks(ray) == 0


@pytest.mark.slow  # a Ray of its own (about 20 s)
def test_raised_soft_limit_starts_extra_workers_for_queued_tasks(own_ray):
    """The control: keeping idle workers with a raised num_workers_soft_limit instead (the earlier
    setting) makes Ray start workers for the queued tasks."""
    config = {**ray_system_config(), "num_workers_soft_limit": 1024}
    del config["idle_worker_killing_time_threshold_ms"]
    ray = own_ray(address="local", num_cpus=2, include_dashboard=False, _system_config=config)
    assert _extra_workers_for_queued_tasks(ray) >= 1


def test_decode_slots_never_exceed_the_videos_to_decode():
    """Free CPUs, the actors' decode tasks in flight and the videos left each cap the warm decode workers: a
    1-video job warms one worker, not one per free slot (each warm-up imports the decoders beside the
    actors' model loading)."""
    execution = ExecutionConfig(decode_num_cpus=0.25, shards_per_actor=2, decode_in_flight=2)
    split = ExecutionSplit(actors=1, num_gpus=0, num_cpus=1.0, batch_size=1, torch_threads=1)
    assert decode_slots(split, execution, cluster_cpus=2, videos=1000) == 4  # by the 1 free CPU
    assert decode_slots(split, execution, cluster_cpus=16, videos=1000) == 4  # by 2 shards x 2 in flight
    assert decode_slots(split, execution, cluster_cpus=16, videos=3) == 3
    assert decode_slots(split, execution, cluster_cpus=16, videos=1) == 1
    assert decode_slots(split, execution, cluster_cpus=1, videos=5) == 0  # no CPU left beside the actor


def test_cold_start_warning(caplog):
    """Most tasks on new workers means Ray is killing idle decode workers: the log says what to set."""
    with caplog.at_level(logging.WARNING, logger="videoindex.executors.ray_executor"):
        assert not warn_cold_starts(3, tasks=40, cold_starts=2)
        assert not caplog.records
        assert warn_cold_starts(3, tasks=40, cold_starts=30)
    (record,) = caplog.records
    assert "[shard 00003] 30 of 40" in record.getMessage()
    assert "RAY_idle_worker_killing_time_threshold_ms=600000" in record.getMessage()


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _metric_total(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (over its tags), from the /metrics text."""
    lines = [ln for ln in text.splitlines() if ln.startswith(f"ray_{name}") and not ln.startswith("#")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def test_a_decode_killed_by_rays_memory_monitor_is_out_of_memory(
    own_ray, tiny_model_dir, sample_videos, tmp_path
):
    """A real decode whose memory runs away (past Ray's memory monitor threshold, set 4 GiB above what the
    machine uses now: about 1.5 GiB for this Ray, its actor and workers, up to 2.2 GiB that the other
    xdist worker's tests come and go by; far below decode.max_memory_mb): Ray kills its worker, the video
    is an out_of_memory row saying so after Ray's retry (one here, 0.1 s later: videoindex's Ray makes
    two, Ray waits 1 s then 2 s), and the job goes on with the next video."""
    import psutil

    memory = psutil.virtual_memory()
    threshold = (memory.total - memory.available + 4 * 2**30) / memory.total
    own_ray(address="local", num_cpus=2, include_dashboard=False, _system_config={
        **ray_system_config(), "memory_usage_threshold": threshold, "memory_monitor_refresh_ms": 100,
        "task_oom_retries": 1, "task_oom_retry_delay_base_ms": 100})  # fmt: skip
    (sample_videos / "demo.mp4.hog").write_text("8192")  # stops at 8 GiB if the monitor never acts
    config = small_job_config(sample_videos, tmp_path / "out", tiny_model_dir, **{
        "execution.executor": "ray", "decode.decoder": "tests.faulty_decoder:open_faulty",
        "decode.max_memory_mb": 16384, "decode.timeout_s": 300, "execution.actors": 1})  # fmt: skip
    result = run_job(config)
    videos = videos_by_name(tmp_path / "out")
    assert result.exit_code == EXIT_VIDEOS_FAILED
    assert videos["demo.mp4"]["error_type"] == "out_of_memory", videos["demo.mp4"]["error_message"]
    assert "Ray's memory monitor" in videos["demo.mp4"]["error_message"]
    assert videos["carphone_pristine.mp4"]["status"] == "ok"
