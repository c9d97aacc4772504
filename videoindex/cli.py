"""The `videoindex` command: run, demo, status, resume, compact, query, report, submit.

Exit codes (every subcommand):
  0  job finished, every video indexed
  1  job finished, some videos failed (each has a videos row with status=error and its reason)
  2  job failed or could not start (bad config, unusable input/output, model not loadable, shards failed)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from importlib import resources
from typing import Any

from videoindex.config import DEFAULT_MODEL, ConfigError, load_config, parse_storage_options

EXAMPLES = """examples:
  videoindex demo                                   # bundled sample videos, local Ray
  videoindex run /data/videos out/ --model /ckpt/videomae-small-finetuned-ssv2
  videoindex run 's3://bucket/raw/**/*.mp4' s3://bucket/index/ --actors 4 --batch-size 32
  videoindex run manifest.csv out/ --sampling ssv2 --config job.yaml
  videoindex status out/
  videoindex resume out/ --retry-failed
  videoindex compact out/                           # few large files for readers (jobs do it at their end)
  videoindex query out/ summary
  videoindex report out/ --out report.html
"""

RUN_FLAGS = {  # CLI flag -> job config key
    "model": "model.name",
    "sampling": "sampling.strategy",
    "clip_stride": "sampling.clip_stride",
    "max_clips_per_video": "sampling.max_clips_per_video",
    "shard_size": "output.shard_size",
    "actors": "execution.actors",
    "batch_size": "execution.batch_size",
    "decoder": "decode.decoder",
    "top_k": "model.top_k",
    "device": "model.device",
    "dtype": "model.dtype",
    "address": "execution.address",
    "executor": "execution.executor",
}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML job config; flags override its values")
    p.add_argument("--model", help=f"hub id or local checkpoint dir (default {DEFAULT_MODEL})")
    p.add_argument(
        "--random-weights",
        action="store_true",
        default=None,
        help="seeded random weights of the model's architecture (demos, benchmarks; recorded in the output)",
    )
    p.add_argument(
        "--sampling", choices=["sliding", "uniform", "ssv2"], help="clip sampling (default sliding)"
    )
    p.add_argument(
        "--clip-stride", type=int, metavar="FRAMES", help="frames between sampled frames (default 4)"
    )
    p.add_argument("--max-clips-per-video", type=int, metavar="N")
    p.add_argument("--shard-size", type=int, metavar="N", help="videos per shard (default 64)")
    p.add_argument(
        "--actors", type=int, metavar="N", help="model actors (default: one per GPU, else one per CPU node)"
    )
    p.add_argument(
        "--batch-size", type=int, metavar="N", help="clips per model call (default: 1 on CPU, 16 on CUDA)"
    )
    p.add_argument("--decoder", choices=["decord", "pyav"], help="video decoder (default decord)")
    p.add_argument("--top-k", type=int, metavar="K", help="labels kept per clip (default 5)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--executor",
        choices=["ray", "local"],
        help="ray (default): Ray actors and tasks; local: this process + decode processes, no Ray",
    )
    p.add_argument("--address", help="Ray address (default: local Ray, or RAY_ADDRESS)")
    p.add_argument("--thumbnails", action="store_true", default=None, help="store a small JPEG per clip")
    p.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)"
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="re-process committed shards too (their files are replaced by a new version)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--update",
        action="store_true",
        default=None,
        help="list INPUT again and index only new and changed videos; drop the rows of deleted ones",
    )
    p.add_argument(
        "--allow-mass-delete",
        action="store_true",
        default=None,
        help="with --update: allow deleting more than half of the index's videos",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(args, flag) for flag, key in RUN_FLAGS.items()}
    if getattr(args, "input", None):
        out["input.uri"] = args.input
    if getattr(args, "output", None):
        out["output.uri"] = args.output
    if args.random_weights:
        out["model.random_weights"] = True
    if args.thumbnails:
        out["output.thumbnails"] = True
    if getattr(args, "update", None):
        out["input.update"] = True
    if getattr(args, "allow_mass_delete", None):
        out["input.allow_mass_delete"] = True
    if args.storage_option:
        options = parse_storage_options(args.storage_option)
        out["input.storage_options"] = options
        out["output.storage_options"] = options
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videoindex",
        description="Index video collections with a VideoMAE classifier into Parquet tables, on Ray.",
        epilog=EXAMPLES + "\n" + (__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every shard")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="index INPUT into OUTPUT",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "input", nargs="?", help="directory/prefix (recursive), glob, or manifest (.txt/.csv/.parquet)"
    )
    run.add_argument("output", nargs="?", help="output directory or URI (e.g. s3://bucket/index)")
    _add_run_flags(run)

    demo = sub.add_parser(
        "demo", help="index the bundled sample videos (random weights when offline, said loudly)"
    )
    demo.add_argument(
        "--output", default="videoindex-demo", help="output directory (default ./videoindex-demo)"
    )
    demo.add_argument("--executor", choices=["ray", "local"], help="ray (default) or local (no Ray)")
    demo.add_argument(
        "--max-clips-per-video", type=int, metavar="N", help="a quicker look: N clips per video"
    )

    status = sub.add_parser("status", help="progress and results of a job, from its output alone")
    status.add_argument("output", help="OUTPUT directory/URI, or a Ray job submission id with --address")
    status.add_argument("--address", help="Ray dashboard address, for a submission id")
    status.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    compact = sub.add_parser(
        "compact", help="copy the videos/errors rows and clip embeddings of committed shards into few files"
    )
    compact.add_argument("output")
    compact.add_argument("--min-shards", type=int, default=1, metavar="N",
                         help="do nothing while fewer than N committed shards are not compacted yet (default 1)")  # fmt: skip
    compact.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=None,
                         help="copy the clip embeddings too, for `query similar` (default: as the last "
                              "compaction did, else the job's output.compact_embeddings)")  # fmt: skip
    compact.add_argument("--storage-option", action="append", metavar="KEY=VALUE")

    resume = sub.add_parser(
        "resume", help="finish the unfinished shards of a job; optionally retry failed videos"
    )
    resume.add_argument("output")
    resume.add_argument(
        "--retry-failed",
        action="store_true",
        help="also re-index failed videos of retryable types (timeout, storage, decoder_crash, out_of_memory)",
    )
    resume.add_argument(
        "--all", action="store_true", dest="retry_all", help="with --retry-failed: every error type"
    )
    resume.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    resume.add_argument("--actors", type=int)
    resume.add_argument("--batch-size", type=int)
    resume.add_argument("--address")
    resume.add_argument("--no-progress", action="store_true")

    for register in _extra_registrars():
        register(sub)
    return parser


def _extra_registrars() -> list[Any]:
    registrars = []
    try:
        from videoindex.query import register_query_cli

        registrars.append(register_query_cli)
    except ImportError:  # pragma: no cover - during development
        pass
    try:
        from videoindex.report import register_report_cli

        registrars.append(register_report_cli)
    except ImportError:  # pragma: no cover
        pass
    try:
        from videoindex.submit import register_submit_cli

        registrars.append(register_submit_cli)
    except ImportError:  # pragma: no cover
        pass
    return registrars


def _print_summary(summary: dict[str, Any], random_weights: bool) -> None:
    print("videoindex: done")
    update = summary.get("update")
    if update is not None:
        from videoindex.format.jobrecord import describe_changes

        changes = describe_changes(update)
        if update["new"] or update["changed"] or update["deleted"]:
            print(
                f"  update            generation {summary['generation']}: {changes}, {update['unchanged']} unchanged"
            )
        elif summary.get("shards_to_run"):
            print(f"  update            nothing changed since generation {summary['generation']}; "
                  f"finished {summary['shards_to_run']} shard(s) of earlier work")  # fmt: skip
        else:
            print(f"  update            nothing changed since generation {summary['generation']}: nothing written")  # fmt: skip
    for key in ("output", "videos", "videos_ok", "videos_error", "clips", "clips_per_s", "wall_s",
                "shards_committed", "shards_failed"):  # fmt: skip
        print(f"  {key:<17} {summary.get(key)}")
    if summary.get("failed_shards"):
        for shard, reason in summary["failed_shards"].items():
            print(f"  shard {shard} failed: {reason}")
    out = summary.get("output")
    print(f"  tables            {out}/clips  {out}/videos  {out}/errors  (Hive-partitioned Parquet)")
    if random_weights:
        print("  !! RANDOM WEIGHTS: labels and scores are meaningless (recorded in _job.json and every row)")


def _progress(args: argparse.Namespace) -> bool | None:
    """--no-progress turns the bar off; otherwise execution.progress (config) decides."""
    return False if args.no_progress else None


def cmd_run(args: argparse.Namespace) -> int:
    from videoindex.job.run import run_job

    config = load_config(args.config, _overrides(args))
    result = run_job(config, rerun=args.rerun, progress=_progress(args))
    _print_summary(result.summary, config.model.random_weights)
    return result.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from videoindex.job.run import run_job
    from videoindex.stages.checkpoint import ModelLoadError

    samples = str(resources.files("videoindex") / "samples")
    config = load_config(None, {"input.uri": samples, "output.uri": args.output, "execution.executor": args.executor,
                                "sampling.max_clips_per_video": args.max_clips_per_video})  # fmt: skip
    try:
        result = run_job(config)  # resolves the model before anything is written
    except ModelLoadError as exc:
        banner = "!" * 100
        print(f"{banner}\n!! videoindex demo: the model {config.model.name} cannot be loaded here:\n!!   {str(exc).splitlines()[0]}\n"
              "!! The demo runs with RANDOM WEIGHTS of the real architecture: labels are meaningless.\n"
              f"!! This is recorded in {args.output}/_job.json and in every row's `model` column.\n{banner}", file=sys.stderr)  # fmt: skip
        config = config.replace(model=dataclasses.replace(config.model, random_weights=True))
        result = run_job(config)
    _print_summary(result.summary, config.model.random_weights)
    print(f"  try: videoindex status {args.output}   |   videoindex query {args.output} summary")
    return result.exit_code


def cmd_resume(args: argparse.Namespace) -> int:
    from videoindex.job.resume import job_config_from_output
    from videoindex.job.run import run_job

    overrides = {
        "execution.actors": args.actors,
        "execution.batch_size": args.batch_size,
        "execution.address": args.address,
    }
    config = job_config_from_output(args.output, parse_storage_options(args.storage_option), **overrides)
    result = run_job(config, resume=True, retry_failed=args.retry_failed, retry_all_errors=args.retry_all and args.retry_failed,
                     progress=_progress(args))  # fmt: skip
    _print_summary(result.summary, config.model.random_weights)
    return result.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from videoindex.status import job_status, render_status

    if not _looks_like_output(args.output):
        if not args.address:
            raise ConfigError(
                f"{args.output} is neither an output directory/URI nor (without --address) a submission id"
            )
        from videoindex.submit import job_status as submission_status

        print(json.dumps(submission_status(args.address, args.output), indent=2, default=str))
        return 0
    report = job_status(args.output, parse_storage_options(args.storage_option))
    print(json.dumps(report, indent=2, default=str) if args.json else render_status(report))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from videoindex import storage
    from videoindex.format.compaction import compact, read_manifest
    from videoindex.format.layout import JOB_FILE

    if args.min_shards < 1:
        raise ConfigError("--min-shards must be >= 1")
    fs, root = storage.filesystem(args.output, parse_storage_options(args.storage_option))
    try:
        record = storage.read_json(fs, storage.join(root, JOB_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{args.output} has no {JOB_FILE}: not a videoindex output") from None
    embeddings = args.embeddings
    if embeddings is None:  # as the last compaction was asked (a job's end, or this command), else the job's
        last = read_manifest(fs, root)
        embeddings = last.embeddings if last is not None and last.embeddings is not None else None
    if embeddings is None:
        embeddings = bool(record.get("config", {}).get("output", {}).get("compact_embeddings", True))
    result = compact(fs, root, min_shards=args.min_shards, embeddings=embeddings)
    if result.seq is None:
        print(
            f"nothing to compact: {result.shards_pending} committed shards not compacted (--min-shards {args.min_shards})"
        )
    elif result.files_written == 0:
        print(f"no shard to copy; manifest {result.seq} no longer names the embedding copies (the next "
              f"compaction deletes them); {result.files_deleted} superseded files deleted")  # fmt: skip
    else:
        print(f"compacted {result.shards_pending} shards into {result.files_written} files (manifest "
              f"{result.seq}); {result.files_deleted} superseded files deleted")  # fmt: skip
    return 0


def _looks_like_output(target: str) -> bool:
    """An OUTPUT is a URI or an existing path; anything else is taken as a Ray job submission id."""
    import os

    return "://" in target or os.path.exists(target)


def _plugin_handler(command: str) -> Any:
    if command == "query":
        from videoindex.query import run_query_cli

        return run_query_cli
    if command == "report":
        from videoindex.report import run_report_cli

        return run_report_cli
    if command == "submit":
        from videoindex.submit import run_submit_cli

        return run_submit_cli
    raise SystemExit(f"videoindex: unknown command {command}")


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_demo,
    "status": cmd_status,
    "resume": cmd_resume,
    "compact": cmd_compact,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    handler = COMMANDS.get(args.command) or _plugin_handler(args.command)
    try:
        return handler(args)
    except (ConfigError, FileNotFoundError, PermissionError) as exc:
        print(f"videoindex {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from videoindex.format.jobrecord import JobMismatchError
        from videoindex.stages.checkpoint import ModelLoadError
        from videoindex.stages.plan import PlanError
        from videoindex.submit import SubmitError

        if isinstance(exc, (JobMismatchError, ModelLoadError, PlanError, SubmitError)):
            print(f"videoindex {args.command}: {exc}", file=sys.stderr)
            return 2
        ray_error = sys.modules["ray.exceptions"].RayError if "ray.exceptions" in sys.modules else OSError
        if isinstance(exc, (OSError, ray_error)):  # storage, network, cluster: one line, named
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"videoindex {args.command}: {type(exc).__name__}: {first}", file=sys.stderr)
            return 2
        raise


def console_main() -> None:
    """The `videoindex` command (console script, ``python -m videoindex.cli``): main(), then a quick exit.

    After a job on Ray, the interpreter's own exit (Ray's atexit shutdown, then finalizing torch, Ray and
    their threads) takes 0.6-1.6 s on 2 cores (benchmarks/bench_fixed_cost.py, row "ray, teardown"). Here
    Ray is shut down, logs and output are flushed, and the process ends at once. Python callers of main()
    keep the usual exit.
    """
    code = main()
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        sys.exit(code)
    ray.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to save
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
