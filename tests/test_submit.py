"""Job submission through the Ray Jobs API, against a real local Ray head with its dashboard.

The head is started with ``ray start --head --block`` in its own process group and stopped by signalling
that group only (never ``ray stop``, which would also stop any other Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from tests import s3server
from tests.conftest import REPO, SAMPLES
from tests.helpers import free_port, free_ports
from videoindex.config import ConfigError, load_config
from videoindex.executors.ray_executor import ray_node_env
from videoindex.submit import (
    CONFIG_ENV,
    WORKING_DIR_EXCLUDES,
    SubmitError,
    job_main,
    job_status,
    run_submit_cli,
    submit_job,
    wait_job,
)

s3_server, s3 = s3server.s3_server, s3server.s3  # the moto fixtures
VENV_BIN = Path(sys.executable).parent
DEMO_CONFIG = REPO / "jobs" / "configs" / "local_demo.yaml"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s}s:\n{log.read_text()[-3000:]}")


pytestmark = pytest.mark.ray  # a Ray head of its own (ray start), for the Jobs API


@pytest.fixture(scope="module")
def ray_head(_ray_owner):
    """A local Ray head with its dashboard on free ports; yields the dashboard address. The tests' shared
    Ray is stopped first: two Rays on 2 cores starve each other."""
    _ray_owner.stop()
    temp_dir = Path(tempfile.mkdtemp(prefix="vi-ray-", dir="/tmp"))  # short: Ray's socket paths are long
    gcs, dashboard, client, agent = free_ports(4)
    ports = {"--port": gcs, "--dashboard-port": dashboard, "--ray-client-server-port": client,
             "--dashboard-agent-listen-port": agent}  # fmt: skip
    # The node's environment as cluster/Dockerfile sets it (ray_node_env); jobs run this venv's python.
    env = {**os.environ, **ray_node_env(), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               *(f"{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    log = temp_dir / "ray-start.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version", proc, log)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then, a second later, SIGKILL what is left of it.

    Most of Ray's processes exit on SIGTERM at once; the raylet, the GCS, an agent and ``ray start
    --block`` linger for 10-30 s, so they are not waited for. Workers run in their own sessions and exit
    when their raylet goes.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _demo_config(tmp_path: Path, name: str = "job.yaml", **sections) -> Path:
    """local_demo.yaml with a one-video input, two clips per video and the output in tmp_path."""
    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    videos = tmp_path / "in"
    videos.mkdir(exist_ok=True)
    shutil.copy(SAMPLES / "demo.mp4", videos / "demo.mp4")
    tree["input"]["uri"] = str(videos)
    tree["output"]["uri"] = str(tmp_path / "out")
    tree.setdefault("sampling", {})["max_clips_per_video"] = 2
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def _clip_rows(output: Path) -> int:
    return pads.dataset(output / "clips", format="parquet", partitioning="hive").count_rows()


# --- without a cluster --------------------------------------------------------------------------------


def test_unreachable_address_is_one_clear_line(capsys):
    from videoindex.cli import main

    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", str(DEMO_CONFIG)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Ray dashboard" in err
    assert run_submit_cli(_cli_args(None, str(DEMO_CONFIG))) == 2
    assert "--address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "job_args", "message"),
    [
        ({"output": {"uri": "relative/out"}}, (), "is relative"),
        ({}, ("--retry-everything",), "unknown job arguments"),
        ({"output": {"storage_options": {"secret": "s3cr3t"}}}, (), "cannot reach"),  # only a warning
    ],
)
def test_unsafe_submissions_are_refused_before_reaching_the_cluster(
    tmp_path, capsys, change, job_args, message
):
    config = _demo_config(tmp_path, **change)
    with pytest.raises(SubmitError, match=message):
        submit_job(f"http://127.0.0.1:{free_port()}", str(config), job_args=job_args)
    assert ("credentials" in capsys.readouterr().err) == ("storage_options" in change.get("output", {}))


def test_output_inside_the_checkout_is_not_shipped(tmp_path):
    from videoindex.submit import _runtime_env

    config = load_config(str(_demo_config(tmp_path)), {"output.uri": str(REPO / "my-output")})
    runtime_env = _runtime_env(config, "yaml text", REPO, {"pip": None, "extra_env": {"A": 1}})
    assert runtime_env["working_dir"] == str(REPO) and "/my-output" in runtime_env["excludes"]
    assert runtime_env["env_vars"] == {"A": "1", CONFIG_ENV: "yaml text"}


def test_bad_config_is_refused_before_submission(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {uri: /videos}\nexecution: {batch_size: 0}\n")
    with pytest.raises(ConfigError, match="output.uri"):
        submit_job("http://127.0.0.1:1", str(bad))


def test_job_main_reports_bad_config_and_unusable_output(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CONFIG_ENV, "input: {uri: /videos}\nmodel: {top_k: 0}\n")
    assert job_main([f"env:{CONFIG_ENV}"]) == 2
    assert "cannot start" in caplog.text and "output.uri" in caplog.text
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = _demo_config(tmp_path, output={"uri": str(blocker / "out")})
    caplog.clear()
    assert job_main([str(config)]) == 2
    assert "cannot start" in caplog.text and str(blocker) in caplog.text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (["jobs/index_job.py"], "output.uri: no output directory"),
        (["-m", "videoindex.submit"], "output.uri: no output directory"),  # installed, no checkout shipped
        (["-I", "-S", "jobs/index_job.py"], "cannot import videoindex"),
    ],
    ids=["script", "module", "videoindex-missing"],
)
def test_entrypoint_exits_2_with_the_reason_on_stderr(entry, message):
    """The entrypoint as Ray runs it: exit code 2 and the reason, not a traceback."""
    env = {**os.environ, CONFIG_ENV: "input: {uri: /videos}\n"}
    command = [sys.executable, *entry, f"env:{CONFIG_ENV}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_job_main_fails_in_seconds_on_a_missing_bucket(s3, tmp_path, caplog):
    config = _demo_config(
        tmp_path, output={"uri": "s3://no-such-bucket/index", "storage_options": s3.options()}
    )
    started = time.time()
    assert job_main([str(config)]) == 2
    assert time.time() - started < 20  # before the model is loaded
    assert "bucket 'no-such-bucket' does not exist" in caplog.text


def _cli_args(address: str, config: str, **flags):
    import argparse

    defaults = {"address": address, "config": config, "follow": False, "no_wait": False, "working_dir": None,
                "pip": None, "env": None, "resume": False, "retry_failed": False, "set": None, "update": False,
                "allow_mass_delete": False}  # fmt: skip
    return argparse.Namespace(**{**defaults, **flags})


# --- against a real local Ray head -----------------------------------------------------------------------


def test_working_dir_ships_the_checkout_without_venv(ray_head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    runtime_env = {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES}
    listing = "import os, videoindex; print('LISTING', sorted(os.listdir('.')), videoindex.__file__)"
    sid = client.submit_job(entrypoint=f'python -c "{listing}"', runtime_env=runtime_env)
    status, code = wait_job(client, sid, stream_logs=False, poll_s=0.5)
    logs = client.get_job_logs(sid)
    assert (status, code) == ("SUCCEEDED", 0), logs
    line = next(ln for ln in logs.splitlines() if ln.startswith("LISTING"))
    assert "'jobs'" in line and "'videoindex'" in line
    assert "'.venv'" not in line and "'.git'" not in line


def test_submit_job_follow_indexes_the_demo(ray_head, tmp_path, tiny_model_dir, capsys):
    config = _demo_config(tmp_path, model={"name": str(tiny_model_dir), "random_weights": False})
    result = submit_job(ray_head, str(config), follow=True)
    out = capsys.readouterr().out
    assert result.submission_id in out and str(tmp_path / "out") in out
    assert (result.status, result.exit_code) == ("SUCCEEDED", 0), out[-4000:]
    assert "videoindex job finished with exit code 0" in out  # the job's log was streamed
    assert _clip_rows(tmp_path / "out") == 2
    status = job_status(ray_head, result.submission_id)
    assert status["status"] == "SUCCEEDED" and status["output"] == str(tmp_path / "out")
    assert status["entrypoint"] == f"python jobs/index_job.py env:{CONFIG_ENV}"
    from videoindex.cli import main  # `videoindex status SUBMISSION_ID --address`: the same, as JSON

    capsys.readouterr()
    assert main(["status", result.submission_id, "--address", ray_head]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "SUCCEEDED" and printed["output"] == str(tmp_path / "out")

    shutil.copy(SAMPLES / "carphone_pristine.mp4", tmp_path / "in" / "carphone.mp4")  # `submit --update`
    assert run_submit_cli(_cli_args(ray_head, str(config), update=True, follow=True)) == 0
    assert "update to generation 1: 1 new, 0 changed, 0 deleted, 1 unchanged" in capsys.readouterr().out
    assert _clip_rows(tmp_path / "out") == 4


def test_plain_ray_job_submit(ray_head, tmp_path, tiny_model_dir):
    config = _demo_config(tmp_path)  # an absolute path: this cluster shares the machine's disk
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
               "--", "python", "jobs/index_job.py", str(config), "--set", f"model.name={tiny_model_dir}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert _clip_rows(tmp_path / "out") == 2


def test_bad_config_job_fails_fast_with_reason_in_logs(ray_head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    runtime_env = {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES,
                   "env_vars": {CONFIG_ENV: "input: {uri: /videos}\noutput: {uri: /tmp/x, shard_size: 0}\n"}}  # fmt: skip
    started = time.time()
    sid = client.submit_job(entrypoint=f"python jobs/index_job.py env:{CONFIG_ENV}", runtime_env=runtime_env)
    status, code = wait_job(client, sid, stream_logs=False, poll_s=0.5)
    assert (status, code) == ("FAILED", 2)
    assert time.time() - started < 60
    assert "output.shard_size must be >= 1" in client.get_job_logs(sid)
    assert job_status(ray_head, sid)["driver_exit_code"] == 2
    with pytest.raises(SubmitError, match="no job"):
        job_status(ray_head, "raysubmit_doesnotexist")
