"""Does memory stay flat as the input grows? The same job on N, 4N and 16N videos, peak memory of each.

    .venv/bin/python benchmarks/bench_memory.py [--model tiny|full] [--videos 3] [--seconds 10]
        [--steps 1,4,16] [--shard-size 4]

Input: the bundled samples plus ``--videos`` synthetic videos, hard-linked ``k`` times under new names for
each step ``k`` (distinct URIs, so distinct videos to the job). Each step runs ``run_job`` on a fresh
output of one local Ray with the shipped execution defaults; a sampler (psutil, by Ray process title)
records the peak RSS of the driver, the model actor and the decode workers, and object store bytes used.
Flat means: the largest step's peaks are those of the smallest, within allocator noise, while the
input (videos, clips, shards) grows 16x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import end_to_end, machine, tiny_model_dir  # noqa: E402
from benchmarks.common import markdown_table, prepare_input  # noqa: E402
from videoindex.config import load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("full", "tiny"), default="tiny")
    parser.add_argument("--videos", type=int, default=3, help="synthetic videos besides the 3 samples")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--steps", default="1,4,16", help="copies of the input per step")
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videoindex-bench")
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
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows: list[list[Any]] = []
    for copies in (int(s) for s in args.steps.split(",")):
        inputs = replicate(folder, copies, args.workdir / f"memory-input-{copies}x")
        config = load_config(None, {"input.uri": str(inputs), "output.uri": str(args.workdir / f"memory-{copies}x"),
                                    "output.shard_size": args.shard_size, "execution.progress": False, **model})  # fmt: skip
        result = end_to_end(config)
        peaks = {role: max(halves) for role, halves in result["memory"].items()}
        videos = len(list(inputs.iterdir()))
        rows.append([copies, videos, result["clips"], -(-videos // args.shard_size), f"{result['busy_cps']:.2f}",
                     *(f"{peaks.get(r, 0):.0f}" for r in ("driver", "actor", "decode", "store"))])  # fmt: skip
        print(f"step {copies}x done: {rows[-1]}", flush=True)
    ray.shutdown()
    print(f"\n{machine()}; model {args.model}; shard size {args.shard_size}\n")
    header = [
        "copies",
        "videos",
        "clips",
        "shards",
        "clips/s",
        "driver MiB",
        "actor MiB",
        "decode MiB",
        "store MiB",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
