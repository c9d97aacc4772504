"""Faults on a real local multi-node Ray cluster: the final tables equal a clean run's, bit for bit.

Each test runs the same job as a clean reference run (same input, same settings) into its own output,
injects one fault in the middle, and compares the table files byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES
from tests.helpers import (
    cli_job_yaml,
    run_job_in_thread,
    small_job_config,
    table_hashes,
    videos_by_name,
    wait_shard_started,
)
from videoindex import storage
from videoindex.format.ledger import Ledger
from videoindex.job.run import run_job
from videoindex.status import job_status

pytestmark = [pytest.mark.timeout(300), pytest.mark.multinode]

VIDEOS = 4
DECODER = "tests.faulty_decoder:open_faulty"


def _config(input_dir: Path, output: Path, model_dir: Path, **extra):
    """Two actors of one CPU on a 5-CPU cluster, one video per shard, the misbehaving decoder."""
    return small_job_config(input_dir, output, model_dir, **{
        "decode.decoder": DECODER, "output.shard_size": 1, "execution.executor": "ray", "execution.actors": 2,
        "execution.actor_num_cpus": 1,
        "execution.shards_per_actor": 1, **extra})  # fmt: skip


@pytest.fixture(scope="module")
def cluster(_ray_owner):
    """A head and two worker nodes; the test may remove a worker node. It replaces the shared Ray for the
    module (the next ray_session user starts that again)."""
    import ray
    from ray.cluster_utils import Cluster

    from videoindex.executors.ray_executor import ray_system_config

    _ray_owner.stop()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": ray_system_config()})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults-in")
    for i in range(VIDEOS):
        shutil.copy(SAMPLES / "carphone_pristine.mp4", folder / f"video-{i}.mp4")
    return folder


@pytest.fixture()
def slow_videos(input_dir, clean) -> Iterator[None]:
    """Each video decodes in >= 1 s while the test runs, so that it can kill things mid-shard (after the
    clean run, which needs no such wait)."""
    markers = [input_dir / f"video-{i}.mp4.slow" for i in range(VIDEOS)]
    for marker in markers:
        marker.write_text("1.0")
    yield
    for marker in markers:
        marker.unlink()


@pytest.fixture(scope="module")
def clean(input_dir, tiny_model_dir_module, tmp_path_factory) -> dict[str, str]:
    """The reference tables, from the local executor: both executors write the same bytes for the same
    settings (tests/test_ray_executor.py), and it costs no Ray job."""
    output = tmp_path_factory.mktemp("clean") / "out"
    config = _config(input_dir, output, tiny_model_dir_module, **{"execution.executor": "local"})
    assert run_job(config).exit_code == 0
    hashes = table_hashes(output)
    assert len(hashes) == 3 * VIDEOS
    return hashes


@pytest.fixture(scope="module")
def tiny_model_dir_module(tmp_path_factory):
    from tests.tinymodel import make_tiny_videomae

    return make_tiny_videomae(tmp_path_factory.mktemp("tiny-faults"))


def test_actor_killed_mid_shard(cluster, input_dir, slow_videos, tiny_model_dir_module, clean, tmp_path):
    output = tmp_path / "out"
    thread, box = run_job_in_thread(_config(input_dir, output, tiny_model_dir_module))
    record = wait_shard_started(output)
    os.kill(record["pid"], signal.SIGKILL)
    thread.join(300)
    assert box["result"].exit_code == 0
    assert table_hashes(output) == clean
    status = job_status(str(output))
    assert status["shards"]["committed"] == VIDEOS
    failed = [f for f in status["failures"] if f["shard"] == record["shard"]]
    assert failed and "actor" in failed[0]["reason"]
    # The restarting actor gets no shard until it answers: only the shard it held (shards_per_actor 1)
    # failed, once, instead of shards failing attempt after attempt while Ray restarts it.
    assert [f["shard"] for f in status["failures"]] == [record["shard"]], status["failures"]


def test_worker_node_removed(cluster, input_dir, slow_videos, tiny_model_dir_module, clean, tmp_path):
    c, workers = cluster
    output = tmp_path / "out"
    thread, box = run_job_in_thread(_config(input_dir, output, tiny_model_dir_module))
    # Ray may place one of the two actors on the head (1 CPU): wait for a shard running on a worker node.
    record = wait_shard_started(output, nodes={n.node_id for n in workers})
    victim = next(n for n in workers if n.node_id == record["node"])
    c.remove_node(victim)
    thread.join(300)
    assert box["result"].exit_code == 0
    assert table_hashes(output) == clean
    assert any(f["shard"] == record["shard"] for f in job_status(str(output))["failures"])
    workers.remove(victim)
    workers.append(c.add_node(num_cpus=2))


def test_hanging_and_crashing_decoder_then_retry_failed(
    cluster, input_dir, tiny_model_dir_module, clean, tmp_path
):

    output = tmp_path / "out"
    config = _config(input_dir, output, tiny_model_dir_module, **{"decode.timeout_s": 5})
    hang, crash = input_dir / "video-1.mp4.hang", input_dir / "video-2.mp4.crash"
    hang.write_text("")
    crash.write_text("")
    try:
        result = run_job(config)
    finally:
        hang.unlink()
        crash.unlink()
    assert result.exit_code == 1
    videos = videos_by_name(output)
    assert videos["video-1.mp4"]["error_type"] == "timeout"
    assert "longer than 5 s" in videos["video-1.mp4"]["error_message"]
    assert videos["video-2.mp4"]["error_type"] == "decoder_crash"
    assert sum(v["status"] == "ok" for v in videos.values()) == VIDEOS - 2
    assert table_hashes(output) != clean

    # the "repaired" videos index now; a generous timeout: a retried video may wait for a fresh worker
    again = run_job(config.replace(decode=dataclasses.replace(config.decode, timeout_s=300)), resume=True,
                    retry_failed=True)  # fmt: skip
    assert again.exit_code == 0
    assert table_hashes(output) == clean


def test_driver_killed_then_resume(cluster, input_dir, slow_videos, tiny_model_dir_module, clean, tmp_path):
    c, _ = cluster
    output = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": c.address, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "videoindex.cli", "run", str(input_dir), str(output), "--model", str(tiny_model_dir_module),
           "--shard-size", "1", "--actors", "2", "--batch-size", "4", "--no-progress"]  # fmt: skip
    cfg = cli_job_yaml(output.parent / "job.yaml", "actor_num_cpus: 1, decode_num_cpus: 0.5, shards_per_actor: 1",
                       decode=f"decoder: '{DECODER}'")  # as _config (small_job_config)  # fmt: skip
    driver = subprocess.Popen([*cmd, "--config", cfg], env=env, cwd=REPO)
    fs, root = storage.filesystem(str(output))
    deadline = time.time() + 120
    while time.time() < deadline and len(Ledger(fs, root).view().committed()) < 1:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    committed = Ledger(fs, root).view().committed()
    assert 1 <= len(committed) < VIDEOS, "the driver must die mid-job"
    resume = subprocess.run(  # console_main: Ray shut down, output flushed, os._exit
        [sys.executable, "-m", "videoindex.cli", "resume", str(output), "--no-progress"], env=env, cwd=REPO,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert resume.returncode == 0
    assert resume.stdout.splitlines()[-1].startswith("  tables            "), resume.stdout
    assert table_hashes(output) == clean
    status = job_status(str(output))
    assert status["shards"]["committed"] == VIDEOS and status["shards"]["running"] == 0
