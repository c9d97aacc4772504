"""Shared test helpers: a small job config for a 2-core machine, and content hashes of a job's tables."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from videoindex.config import JobConfig, load_config


def small_job_config(
    input_uri: str | Path, output: str | Path, model_dir: str | Path, **overrides: Any
) -> JobConfig:
    """A job on the tiny model: the local executor unless ``execution.executor`` says ray (its numbers fit
    the 2-CPU test Ray: two actors plus a decode task).

    PyAV (and the tests' plug-ins over it) scale with swscale, so decode workers never import torch (about
    2 s a worker on 2 cores); tests that compare pixels with the reference resize ask for
    ``decode.scale: rgb``. Decode workers run at normal priority: at idle priority beside other tests'
    processes they only wait."""
    decoder = str(overrides.get("decode.decoder", "pyav"))
    scale = "swscale" if decoder == "pyav" or decoder.startswith("tests.") else "rgb"
    return load_config(
        None,
        {
            "input.uri": str(input_uri),
            "output.uri": str(output),
            "model.name": str(model_dir),
            "output.shard_size": 2,
            "execution.batch_size": 4,
            "execution.actor_num_cpus": 0.5,
            "execution.decode_num_cpus": 0.5,
            "execution.decode_idle_priority": False,
            "execution.progress": False,
            "execution.executor": "local",
            "decode.scale": scale,
            **overrides,
        },
    )


def cli_job_yaml(path: Path, execution: str = "", sections: str = "", *, decode: str = "") -> str:
    """A job YAML at ``path`` giving a CLI run small_job_config's decoding (swscale, decode workers at
    normal priority): an output written by one and updated by the other must agree on decode.scale.
    ``execution`` and ``decode``: more keys of those sections ("heartbeat_s: 0.5"); ``sections``: more
    YAML."""
    execution, decode = (f", {keys}" if keys else "" for keys in (execution, decode))
    path.write_text(f"decode: {{scale: swscale{decode}}}\n"
                    f"execution: {{decode_idle_priority: false{execution}}}\n{sections}")  # fmt: skip
    return str(path)


def table_hashes(output: Path) -> dict[str, str]:
    """sha256 of each shard's Parquet file of the clips, videos and errors tables, by table and shard (a
    rewrite names its files by version); a second file in a shard's folder fails the test."""
    found: dict[str, str] = {}
    for path in sorted(p for t in ("clips", "videos", "errors") for p in (output / t).rglob("*.parquet")):
        key = str(path.parent.relative_to(output))
        assert key not in found, f"two files in {key}: files left behind by a rewrite"
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def videos_by_name(output: Path) -> dict[str, dict[str, Any]]:
    """The job's videos rows keyed by file name; a video with two rows fails the test."""
    import pyarrow.dataset as ds

    rows = ds.dataset(output / "videos", partitioning="hive").to_table().to_pylist()
    by_name = {Path(row["uri"]).name: row for row in rows}
    assert len(by_name) == len(rows), f"duplicate videos rows: {sorted(Path(r['uri']).name for r in rows)}"
    return by_name


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are picked (a released port may come back)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def run_job_in_thread(config: JobConfig) -> tuple[threading.Thread, dict[str, Any]]:
    """run_job(config) in a daemon thread; its result lands in the returned dict under "result"."""
    from videoindex.job.run import run_job

    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=run_job(config)), daemon=True)
    thread.start()
    return thread, box


def wait_shard_started(
    output: Path, *, timeout: float = 120, nodes: set[str] | None = None
) -> dict[str, Any]:
    """The started record of a shard attempt that is running (on one of ``nodes``), from the ledger."""
    from videoindex import storage
    from videoindex.format.ledger import Ledger

    fs, root = storage.filesystem(str(output))
    deadline = time.time() + timeout
    while time.time() < deadline:
        for shard, state in Ledger(fs, root).view().running().items():
            if nodes is None or state.running.get("node") in nodes:
                return {**state.running, "shard": shard}
        time.sleep(0.2)
    raise AssertionError("no shard started in time")


def wait_for(condition, *, timeout: float = 120.0, every: float = 0.2):
    """Poll ``condition()`` until it returns something truthy; that value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout:g} s")
