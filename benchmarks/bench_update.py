"""`run --update` at scale: list N URIs again (a manifest with size and mtime, default 1,000,000) and diff
them against a stored plan of the same collection before it changed.

    .venv/bin/python benchmarks/bench_update.py [--videos 1000000] [--changed 0.01] [--new 0.01] [--deleted 0.005]

Prints the time to read the stored plan, list the input again, diff, and write the next plan, the counts
found (they must equal the changes made), and the peak RSS of this process against its RSS before the
update (the driver does exactly this before an update's work starts; no video is opened).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from videoindex import storage
from videoindex.config import InputConfig
from videoindex.format.plans import read_plan, write_plan
from videoindex.job.update import diff_plan, listing_table
from videoindex.stages.plan import list_inputs, make_plan

MTIME, LATER = "2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00"


def _manifest(path: Path, uris: list[str], sizes: list[int], mtimes: list[str]) -> None:
    pq.write_table(pa.table({"uri": uris, "size_bytes": sizes, "mtime": mtimes}), path)


def setup(folder: Path, args: argparse.Namespace) -> dict[str, int]:
    """The stored plan of the collection before, and a manifest of it after the changes; returns those."""
    n = args.videos
    uris = [f"s3://bucket/videos/{i % 1000:03d}/clip-{i:08d}.mp4" for i in range(n)]
    every = {k: max(1, round(1 / v)) for k, v in (("changed", args.changed), ("deleted", args.deleted))}
    _manifest(folder / "before.parquet", uris, [1000 + i for i in range(n)], [MTIME] * n)
    fs, root = storage.filesystem(str(folder / "out"))
    rows = list_inputs(InputConfig(uri=str(folder / "before.parquet")))
    write_plan(fs, root, make_plan(rows, args.shard_size), args.shard_size)
    kept = [i for i in range(n) if i % every["deleted"] != 1]
    added = [f"s3://bucket/new/clip-{i:08d}.mp4" for i in range(round(n * args.new))]
    touched = [i % every["changed"] == 0 for i in kept]
    _manifest(folder / "after.parquet", [uris[i] for i in kept] + added,
              [1000 + i + (7 if t else 0) for i, t in zip(kept, touched, strict=True)] + [5] * len(added),
              [LATER if t else MTIME for t in touched] + [LATER] * len(added))  # fmt: skip
    changed = sum(touched)
    return {"new": len(added), "changed": changed, "deleted": n - len(kept), "unchanged": len(kept) - changed}


def measure(folder: Path, shard_size: int) -> None:
    """The update's own work, in a process that did nothing else (its peak RSS is the update's)."""
    fs, root = storage.filesystem(str(folder / "out"))
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    plan = read_plan(fs, root)
    t1 = time.perf_counter()
    listed = listing_table(list_inputs(InputConfig(uri=str(folder / "after.parquet"))))
    t2 = time.perf_counter()
    diff = diff_plan(plan, listed, shard_size, 1)
    t3 = time.perf_counter()
    write_plan(fs, root, diff.plan, shard_size, "_plan/plan-00001.parquet")
    t4 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"| {plan.num_rows:,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} | {t4 - t3:.2f} | {t4 - t0:.2f} "
          f"| {peak / 2**20:.0f} | {rss0 / 2**20:.0f} |")  # fmt: skip
    print(json.dumps(diff.counts()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--new", type=float, default=0.01)
    parser.add_argument("--deleted", type=float, default=0.005)
    parser.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.measure), args.shard_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        expected = setup(Path(tmp), args)
        out = subprocess.run([sys.executable, __file__, "--measure", tmp, "--shard-size", str(args.shard_size)],
                             check=True, capture_output=True, text=True).stdout.splitlines()  # fmt: skip
        print(
            "| videos | read plan s | list again s | diff s | write plan s | total s | peak RSS MB | RSS before MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(out[0])
        found = json.loads(out[1])
        print(f"found {found}; made {expected}")
        assert found == expected


if __name__ == "__main__":
    main()
