"""Fixed cost of a job: a 1-clip job with each executor against the Ray floor, measured in one run.

    .venv/bin/python benchmarks/bench_fixed_cost.py [--model full|tiny] [--repeat 3]

Each figure is the wall time of a fresh process, as a user pays it:

- ``ray floor``: ``python -c "import ray; ray.init(); ray.shutdown()"``
- ``ray job``: ``videoindex run ONE_VIDEO OUT --executor ray --max-clips-per-video 1`` (local Ray)
- ``local job``: the same with ``--executor local`` (no Ray)
- ``ray, teardown``: the ray job through ``sys.exit(cli.main(...))``, the interpreter's own exit (Ray's
  atexit shutdown, finalizing torch and Ray) instead of the command's quick exit (``cli.console_main``)
- ``query summary``: ``videoindex query OUT summary`` on the local job's output (goal 0.8 s)

Goals (issue 17): ray job <= ray floor + 5 s; local job <= 6 s. The model is the default checkpoint's
architecture with seeded random weights (``--model full``) or the tests' tiny VideoMAE (``--model tiny``).
Runs alternate (floor, ray, local) so a machine that speeds up or slows down affects all three alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import timed_command  # noqa: E402

VIDEO = REPO / "videoindex" / "samples" / "carphone_pristine.mp4"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("full", "tiny"), default="full")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="videoindex-fixed-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    (work / "in").mkdir()
    shutil.copy(VIDEO, work / "in" / VIDEO.name)
    if args.model == "tiny":
        sys.path.insert(0, str(REPO))
        from tests.tinymodel import make_tiny_videomae

        model = ["--model", str(make_tiny_videomae(work / "tiny"))]
    else:
        model = ["--random-weights"]
    floor_cmd = [sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"]
    times: dict[str, list[float]] = {"ray floor": [], "ray job": [], "local job": [], "ray, teardown": [],
                                     "query summary": []}  # fmt: skip
    for n in range(args.repeat):
        times["ray floor"].append(timed_command(floor_cmd, env))
        for executor in ("ray", "local"):
            out = work / f"out-{executor}-{n}"
            argv = ["run", str(work / "in"), str(out), *model, "--executor", executor,
                    "--max-clips-per-video", "1", "--no-progress"]  # fmt: skip
            times[f"{executor} job"].append(
                timed_command([sys.executable, "-m", "videoindex.cli", *argv], env)
            )
        argv = ["run", str(work / "in"), str(work / f"out-teardown-{n}"), *model, "--executor", "ray",
                "--max-clips-per-video", "1", "--no-progress"]  # fmt: skip
        old_exit = f"import sys; from videoindex.cli import main; sys.exit(main({argv!r}))"
        times["ray, teardown"].append(timed_command([sys.executable, "-c", old_exit], env))
        query = [sys.executable, "-m", "videoindex.cli", "query", str(work / f"out-local-{n}"), "summary"]
        times["query summary"].append(timed_command(query, env))
    shutil.rmtree(work, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model {args.model}, {args.repeat} alternating runs, wall seconds of a fresh process (median; all runs)"
    )
    for key, values in times.items():
        print(f"  {key:<14} {median[key]:6.2f}   ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"  ray job - ray floor = {median['ray job'] - median['ray floor']:.2f} s (goal <= 5)")
    print(f"  local job           = {median['local job']:.2f} s (goal <= 6)")
    print(
        f"  quick exit saves    = {median['ray, teardown'] - median['ray job']:.2f} s (ray, teardown - ray job)"
    )
    print(f"  query summary       = {median['query summary']:.2f} s (goal <= 0.8)")


if __name__ == "__main__":
    main()
