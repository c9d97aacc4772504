"""Does memory stay flat as the input grows? The same job on k times the input per step, peak memory of each.

    .venv/bin/python benchmarks/bench_memory.py [--model tiny|full] [--videos 3] [--seconds 10]
        [--steps 1,4,16] [--shard-size 4] [--set execution.decode_max_calls=50]

Input: the bundled samples plus ``--videos`` synthetic videos, hard-linked ``k`` times under new names for
each step ``k`` (distinct URIs, so distinct videos to the job). Each step runs ``run_job`` on a fresh
output and a fresh local Ray with the shipped execution defaults; a sampler (psutil, by Ray process title)
records the peak RSS of the driver, the model actor and the decode workers (raw, and less the object
store's shared pages they mapped: their heap and libraries), and object store bytes used.
Flat means: the largest step's peaks are those of the smallest, within allocator noise, while the
input (videos, clips, shards) grows step by step (e.g. 1x to 256x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import end_to_end, machine, tiny_model_dir  # noqa: E402
from benchmarks.common import input_parser, markdown_table, prepare_input  # noqa: E402
from videoindex.config import load_config  # noqa: E402
from videoindex.executors.ray_executor import ray_system_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = input_parser(__doc__, seconds=10.0)
    parser.add_argument("--steps", default="1,4,16", help="copies of the input per step")
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="job config override, e.g. execution.decode_max_calls=50")  # fmt: skip
    return parser.parse_args(argv)


def replicate(folder: Path, copies: int, target: Path) -> Path:
    """``target`` with ``copies`` hard links of every video in ``folder``, each under its own name."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for k in range(copies):
        for video in sorted(folder.iterdir()):
            os.link(video, target / f"copy{k:03d}-{video.name}")
    return target


def main(argv: list[str] | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    folder = prepare_input(args.workdir, videos=args.videos, seconds=args.seconds, size=(width, height))
    model = (
        {"model.name": str(tiny_model_dir(args.workdir))}
        if args.model == "tiny"
        else {"model.random_weights": True}
    )
    rows: list[list[Any]] = []
    rss_rows: list[list[Any]] = []
    for copies in (int(s) for s in args.steps.split(",")):
        inputs = replicate(folder, copies, args.workdir / f"memory-input-{copies}x")
        config = load_config(None, {"input.uri": str(inputs), "output.uri": str(args.workdir / f"memory-{copies}x"),
                                    "output.shard_size": args.shard_size, "execution.progress": False, **model,
                                    **dict(item.split("=", 1) for item in args.set)})  # fmt: skip
        # A fresh Ray per step: pooled workers would carry one step's memory into the next.
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 _system_config=ray_system_config())  # fmt: skip
        result = end_to_end(config)
        ray.shutdown()
        videos = len(list(inputs.iterdir()))
        step = [copies, videos, result["clips"], -(-videos // args.shard_size), f"{result['busy_cps']:.2f}"]
        for table, key in ((rows, "memory"), (rss_rows, "memory_rss")):
            halves = result[key]  # role -> (peak MiB in the first half of the run, in the second half)
            table.append(step + [f"{halves[r][0]:.0f} / {halves[r][1]:.0f}" for r in ("driver", "actor", "decode", "store")])  # fmt: skip
        print(f"step {copies}x done: {rows[-1]} (RSS: {rss_rows[-1][5:8]})", flush=True)
    print(f"\n{machine()}; model {args.model}; shard size {args.shard_size}")
    print("Peak MiB in the first / second half of each run: RSS less object-store pages per process")
    print("(its heap and mapped libraries, not the store's pages); object store bytes used:\n")
    header = [
        "copies",
        "videos",
        "clips",
        "shards",
        "clips/s",
        "driver",
        "actor",
        "decode worker",
        "object store",
    ]
    print(markdown_table(header, rows))
    print("\nThe same runs, raw RSS per process (counts every object-store page the process ever touched):\n")
    print(markdown_table(header, rss_rows))


if __name__ == "__main__":
    main()
