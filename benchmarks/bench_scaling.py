"""Does a second model actor add throughput? The same input with 1 and 2 actors on a 2-node local cluster.

    .venv/bin/python benchmarks/bench_scaling.py [--model tiny|full] [--videos 3] [--seconds 30]
        [--node-cpus 1]

Starts a ``ray.cluster_utils.Cluster`` of two nodes with ``--node-cpus`` logical CPUs each, then runs
``videoindex run`` on the sample videos plus synthetic ones (one video per shard) with
``execution.actors`` 1 and then 2; each actor asks for most of a node's CPUs, so two actors land on two
nodes. Prints clips/s of each run (over the actors' busy span) and the ratio.

Both "nodes" are processes on this machine: they share its physical cores. On a 2-core machine the ratio
is bounded by the cores (one actor with its decode work already keeps them busy when the model runs on
every core), so a ratio near 1 here says nothing about two real machines; on two machines (or a machine
with 2x the cores of one node's share) the same script measures the real scaling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import tiny_model_dir  # noqa: E402
from benchmarks.common import input_parser, markdown_table, prepare_input  # noqa: E402
from videoindex.config import load_config  # noqa: E402
from videoindex.executors.ray_executor import ray_system_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = input_parser(__doc__, seconds=30.0)
    parser.add_argument("--node-cpus", type=float, default=max(1, (os.cpu_count() or 2) // 2))
    return parser.parse_args(argv)


def run_once(args: argparse.Namespace, folder: Path, actors: int, address: str) -> dict[str, Any]:
    from videoindex.job.run import run_job

    output = args.workdir / f"scaling-{actors}"
    shutil.rmtree(output, ignore_errors=True)
    decode_cpus = 0.25 * args.node_cpus
    overrides = {
        "input.uri": str(folder),
        "output.uri": str(output),
        "output.shard_size": 1,  # one video per shard: both actors get work
        "execution.address": address,
        "execution.actors": actors,
        "execution.actor_num_cpus": args.node_cpus - decode_cpus,  # one actor per node
        "execution.torch_threads": max(1, round(args.node_cpus)),
        "execution.decode_num_cpus": decode_cpus,
        "execution.progress": False,
    }
    if args.model == "tiny":
        overrides["model.name"] = str(tiny_model_dir(args.workdir))
    else:
        overrides["model.random_weights"] = True
    result = run_job(load_config(None, overrides))
    if result.exit_code != 0:
        raise RuntimeError(f"run with {actors} actor(s) failed: {result.summary}")
    return result.summary


def main(argv: list[str] | None = None) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_worker_niceness", "0")
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    folder = prepare_input(args.workdir, videos=args.videos, seconds=args.seconds, size=(width, height))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": args.node_cpus,
            "include_dashboard": False,
            "_system_config": ray_system_config(),
        },
    )
    cluster.add_node(num_cpus=args.node_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        runs = {n: run_once(args, folder, n, cluster.address) for n in (1, 2)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    rows = [(n, s["clips"], s["clips_per_s"]) for n, s in runs.items()]
    print(
        f"\n2-node local cluster, {args.node_cpus:g} CPUs per node, {os.cpu_count()} physical cores; model {args.model}\n"
    )
    print(markdown_table(["model actors", "clips", "clips/s"], rows))
    print(f"\n2 actors / 1 actor = {runs[2]['clips_per_s'] / runs[1]['clips_per_s']:.2f}")


if __name__ == "__main__":
    main()
