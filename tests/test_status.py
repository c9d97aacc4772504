"""`videoindex status` tells the truth while a job runs, after it, and after its driver died."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, SAMPLES
from tests.helpers import cli_job_yaml, table_hashes, wait_for
from videoindex.cli import main
from videoindex.status import job_status

HEARTBEAT_S = 0.5


def _status(output: Path) -> dict:
    try:
        return job_status(str(output))
    except FileNotFoundError:  # before the job record is written
        return {}


def test_status_of_a_running_job_then_of_its_dead_driver_then_resumed(tiny_model_dir, tmp_path, capsys):
    """A local job of 4 one-video shards, each decode slowed down, run by a driver process of its own:
    status while it runs (counts, clips/s, ETA, live heartbeats), after the driver and its decode
    workers are killed (not running, the shard it held stalled, the command that continues it), and
    after `videoindex resume` (finished, the same bytes as a clean run)."""
    videos = tmp_path / "in"
    videos.mkdir()
    for i in range(4):
        shutil.copy(SAMPLES / "carphone_pristine.mp4", videos / f"v{i}.mp4")
        (videos / f"v{i}.mp4.slow").write_text("2.0")
    config = cli_job_yaml(tmp_path / "job.yaml", f"heartbeat_s: {HEARTBEAT_S}, decode_workers: 1, checkpoint_every: 2",
                          decode="decoder: 'tests.faulty_decoder:open_faulty'")  # fmt: skip
    output = tmp_path / "out"
    argv = ["run", str(videos), str(output), "--model", str(tiny_model_dir), "--executor", "local", "--shard-size",
            "1", "--config", str(config), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "videoindex.cli", *argv], env=env, cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        live = wait_for(
            lambda: (s := _status(output)) and s["shards"]["committed"] >= 1 and s["running"] and s
        )
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and its decode worker processes
        driver.wait(30)
    assert live["job"]["state"] == "running" and "continue_with" not in live["job"]
    assert live["shards"]["running"] == 1 and live["shards"]["pending"] >= 1
    assert live["shards"]["committed"] + live["shards"]["running"] + live["shards"]["pending"] == 4
    assert live["clips_per_s"] and live["eta_s"] and not live["running"][0]["stalled"]
    assert live["running"][0]["heartbeat_s_ago"] < 3 * HEARTBEAT_S + 1

    # The driver's and the attempt's heartbeats renew on their own clocks: wait until both have gone quiet.
    def dead_and_stalled(s: dict) -> bool:
        return s["job"]["state"] == "not running" and s["shards"]["running"] == 0

    dead = wait_for(lambda: (s := _status(output)) and dead_and_stalled(s) and s, timeout=30)
    assert dead["job"]["continue_with"] == f"videoindex resume {output}"
    assert dead["shards"]["committed"] < 4
    stalled = [r for r in dead["running"] if r["stalled"]]
    assert dead["shards"]["stalled"] == len(stalled) == 1 and stalled[0]["heartbeat_s_ago"] >= 3 * HEARTBEAT_S
    assert main(["status", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "not running" in printed and "STALLED" in printed and f"videoindex resume {output}" in printed

    for i in range(4):
        (videos / f"v{i}.mp4.slow").unlink()
    assert main(["resume", str(output), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", str(output), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["job"]["state"] == "finished" and "continue_with" not in done["job"]
    assert done["shards"]["committed"] == 4 and done["shards"]["stalled"] == 0 and not done["running"]
    clean = tmp_path / "clean"
    assert main(["run", str(videos), str(clean), "--model", str(tiny_model_dir), "--executor", "local",
                 "--shard-size", "1", "--config", str(config), "--no-progress"]) == 0  # fmt: skip
    assert table_hashes(output) == table_hashes(clean)
