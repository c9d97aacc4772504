"""Dispatch overhead: a job of N one-video shards of a 3-frame video with the tiny model (default 300).

    .venv/bin/python benchmarks/bench_dispatch.py [--shards 300] [--executor local ray]

Prints, per executor, the wall time of ``videoindex run`` in a fresh process, the same for a 1-shard job
(the fixed cost: start-up, model load, Ray), the time per shard beyond that fixed cost,
(N-shard job - 1-shard job) / (N - 1), the work in it (the shard stats' mean ``decode_s`` + ``infer_s``:
decoding and classifying one 3-frame video, one padded clip), and the rest: the overhead per shard
(ledger events, three table files, the commit, handing out the shard).
Goal (issue 18): 300 shards in <= 30 s, <= 50 ms per shard beyond the work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import timed_command  # noqa: E402


def _run(folder: Path, output: Path, model: Path, executor: str) -> float:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "videoindex.cli", "run", str(folder), str(output), "--model", str(model),
           "--shard-size", "1", "--executor", executor, "--no-progress"]  # fmt: skip
    return timed_command(cmd, env)


def _work_per_shard_ms(output: Path) -> float:
    from videoindex import storage
    from videoindex.format.ledger import Ledger

    stats = Ledger(*storage.filesystem(str(output))).view().committed_stats()
    return sum(float(s["decode_s"]) + float(s["infer_s"]) for s in stats) / len(stats) * 1000


def main() -> None:
    from tests.tinymodel import make_tiny_videomae
    from tests.videogen import write_index_video

    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=300)
    parser.add_argument("--executor", nargs="+", default=["local", "ray"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_videomae(work / "tiny")
        video = write_index_video(work / "v.mp4", frames=3)
        one, many = work / "one", work / "many"
        one.mkdir()
        many.mkdir()
        (one / "v0000.mp4").write_bytes(video.read_bytes())
        for i in range(args.shards):
            (many / f"v{i:04d}.mp4").write_bytes(video.read_bytes())
        print(f"| executor | 1 shard s | {args.shards} shards s | per shard ms | work per shard ms "
              "| overhead per shard ms |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for executor in args.executor:
            single = _run(one, work / f"out-one-{executor}", model, executor)
            total = _run(many, work / f"out-many-{executor}", model, executor)
            per_shard = (total - single) / (args.shards - 1) * 1000
            work_ms = _work_per_shard_ms(work / f"out-many-{executor}")
            print(f"| {executor} | {single:.1f} | {total:.1f} | {per_shard:.0f} | {work_ms:.0f} "
                  f"| {per_shard - work_ms:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
