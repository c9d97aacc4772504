"""Plan time and peak driver memory for a manifest of N synthetic URIs (default 1,000,000).

    .venv/bin/python benchmarks/bench_plan.py [--videos 1000000]

Prints the time to list (read the manifest), plan (ids, sort, shards) and write the plan, and the peak
RSS of this process (the driver does exactly this before any work starts).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import psutil

from videoindex import storage
from videoindex.config import InputConfig
from videoindex.format.plans import read_plan, write_plan
from videoindex.stages.plan import list_inputs, make_plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.txt"
        with manifest.open("w") as fh:
            for i in range(args.videos):
                fh.write(f"s3://bucket/videos/{i % 1000:03d}/clip-{i:08d}.mp4\n")
        rss0 = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        rows = list_inputs(InputConfig(uri=str(manifest)))
        t1 = time.perf_counter()
        plan = make_plan(rows, args.shard_size)
        del rows
        t2 = time.perf_counter()
        fs, root = storage.filesystem(str(Path(tmp) / "out"))
        write_plan(fs, root, plan, args.shard_size)
        t3 = time.perf_counter()
        one = read_plan(fs, root, shard=12345 % max(1, plan.num_rows // args.shard_size))
        t4 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            "| videos | list s | plan s | write s | total s | read one shard s | peak RSS MB | RSS before MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.videos:,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} | {t3 - t0:.2f} | {t4 - t3:.3f} "
            f"| {peak / 2**20:.0f} | {rss0 / 2**20:.0f} |"
        )
        assert one.num_rows == args.shard_size


if __name__ == "__main__":
    main()
