"""Run (or continue) an indexing job. Ray-free: an executor does the work, this module decides it.

The job: resolve the model once, plan (or read the plan of an existing job) and write the job record,
queue the shards to run, hand the queue to an executor (``local``: this process plus decode worker
processes; ``ray``: model actors and decode tasks on a Ray cluster), then sum up and pick the exit code.
Everything storage-facing happens once per phase: one listing of the output root, one listing of the
ledger, one read of the plan.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from videoindex import storage
from videoindex.config import JobConfig
from videoindex.format.compaction import compact
from videoindex.format.jobrecord import check_compatible, job_record, read_job, refuse_foreign_tables
from videoindex.format.layout import JOB_FILE
from videoindex.format.ledger import Heartbeat, Ledger, LedgerView, committed_totals
from videoindex.format.plans import plan_file_of, read_plan, shard_count, write_plan
from videoindex.job.context import JobContext, decode_settings
from videoindex.job.queue import ShardQueue
from videoindex.job.resume import failed_videos
from videoindex.job.update import PlanDiff, adopt_unnamed_plan, update_plan
from videoindex.stages import plan as planning
from videoindex.stages.checkpoint import ModelInfo, resolve_model

log = logging.getLogger(__name__)

EXIT_OK, EXIT_VIDEOS_FAILED, EXIT_JOB_FAILED = 0, 1, 2
EXECUTORS = ("ray", "local")


@dataclass
class JobResult:
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)


def prepare_output(config: JobConfig, info: ModelInfo, fs: Any, root: str, *, must_exist: bool
                   ) -> tuple[pa.Table, dict[str, Any], PlanDiff | None]:  # fmt: skip
    """Write (or check and reuse) the job record and the plan, updated first with ``input.update``;
    returns the plan in force, the record and the update's diff (None without an update)."""
    storage.check_output_writable(fs, root, config.output.uri)  # fail in seconds, before listing the input
    existing = read_job(fs, root)
    if existing is not None:
        check_compatible(existing, config, info, config.output.uri)
        plan = read_plan(fs, root, file=plan_file_of(existing))
        adopted = adopt_unnamed_plan(fs, root, plan, existing)
        if adopted is not None:
            plan, existing = adopted
        if not config.input.update:
            return plan, existing, None
        return update_plan(config, fs, root, plan, existing, allow_mass_delete=config.input.allow_mass_delete)
    if must_exist:
        raise FileNotFoundError(f"{config.output.uri} has no {JOB_FILE}: nothing to resume")
    refuse_foreign_tables(fs, root, config.output.uri)
    plan = planning.make_plan(planning.list_inputs(config.input), config.output.shard_size)
    # The plan first: _job.json is the marker that the job exists, so it must never point at a missing plan.
    write_plan(fs, root, plan, config.output.shard_size)
    record = job_record(config, info, plan.num_rows, shard_count(plan))
    storage.write_json(fs, storage.join(root, JOB_FILE), record)
    if config.input.update:
        log.info("update: %s holds no index yet, so everything is indexed", config.output.uri)
    log.info("planned %d videos in %d shards", plan.num_rows, shard_count(plan))
    return plan, record, None


def outdated_videos(plan: pa.Table, view: LedgerView) -> dict[int, set[str]]:
    """Per committed shard, the videos an update added, changed or deleted after the shard's commit
    (vectorised: a plan of 1M rows is compared with the commits' generations in one pass)."""
    committed = view.committed()
    if not committed or not plan.num_rows:
        return {}
    shards = plan["shard"].to_numpy()
    since = np.full(int(shards.max()) + 1, np.iinfo(np.int32).max, np.int64)  # uncommitted: never outdated
    for shard in committed:
        if shard < len(since):
            since[shard] = view.state(shard).generation
    outdated = plan["generation"].to_numpy() > since[shards]
    found: dict[int, set[str]] = {}
    ids = plan["video_id"].filter(pa.array(outdated)).to_pylist()
    for shard, video in zip(shards[outdated].tolist(), ids, strict=True):
        found.setdefault(shard, set()).add(video)
    return found


def _queue(config: JobConfig, ledger: Ledger, view: LedgerView, plan: pa.Table, record: dict[str, Any], *,
           rerun: bool, retry: str | None, run: int) -> ShardQueue:  # fmt: skip
    generation = int(record["plan"].get("generation", 0))
    queue = ShardQueue(ledger, plan, config.execution.max_attempts, run=run, generation=generation,
                       checkpoint_every=config.execution.checkpoint_every)  # fmt: skip
    committed = view.committed_versions()
    partial = {} if rerun else outdated_videos(plan, view)
    if retry is not None:
        commits = view.committed_commits()
        for shard, ids in failed_videos(ledger.fs, ledger.root, commits, all_errors=retry == "all").items():
            partial.setdefault(shard, set()).update(ids)
    for shard in range(int(record["plan"]["shards"])):
        attempt = view.state(shard).attempts + 1
        if rerun or shard not in committed:
            queue.add(shard, attempt, committed_version=committed.get(shard))
        elif shard in partial:
            queue.add(shard, attempt, tuple(sorted(partial[shard])), committed_version=committed[shard])
    return queue


def new_run_id(view: LedgerView) -> int:
    """This run's id in the ledger: now in milliseconds, above every earlier run's (a clock set back or
    another machine's cannot slot a run before one already in the log)."""
    last = int(view.last_key.split("-")[0]) if view.last_key else 0
    return max(int(time.time() * 1000), last + 1)


def executor_for(name: str) -> Any:
    """The executor class by name; Ray is imported only when the ray executor is chosen."""
    if name == "local":
        from videoindex.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from videoindex.executors.ray_executor import RayExecutor

        return RayExecutor()
    raise ValueError(f"execution.executor must be one of {', '.join(EXECUTORS)}, got {name!r}")


def summarize(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Video/clip totals over committed shards' stats, and clips/s over the span they were worked on."""
    totals, busy = committed_totals(stats)
    return {**totals, "clips_per_s": round(totals["clips"] / busy, 3) if busy > 0 else None}


def compact_at_end(config: JobConfig, fs: Any, root: str, view: LedgerView | None) -> None:
    """Compact the small tables once ``output.compact_min_shards`` shards are not yet; a failure costs
    readers only speed (their per-shard files stay the truth), so it is a warning, not a failed job.
    ``view``: the ledger as the job's last checkpoint read it (nothing to list while fewer shards than
    that are committed at all)."""
    least = config.output.compact_min_shards
    if least <= 0 or (view is not None and len(view.committed()) < least):
        return
    try:
        compact(fs, root, min_shards=least, view=view, embeddings=config.output.compact_embeddings)
    except Exception as exc:
        log.warning("compaction at the job's end failed (%s); readers use the per-shard files; "
                    "`videoindex compact %s` tries again", exc, config.output.uri)  # fmt: skip


def run_job(
    config: JobConfig,
    *,
    resume: bool = False,
    rerun: bool = False,
    retry_failed: bool = False,
    retry_all_errors: bool = False,
    progress: bool | None = None,
) -> JobResult:
    """Run (or continue) an indexing job; returns the exit code and a summary.

    resume: the OUTPUT must already hold this job. rerun: re-process committed shards too.
    retry_failed: also re-index the failed videos of committed shards (retryable error types, or all
    with retry_all_errors) and replace their rows.
    """
    started = time.time()
    info = resolve_model(config.model, config.preprocess)
    if info.random_weights:
        log.warning("RANDOM WEIGHTS: %s runs with seeded random weights of the real architecture; "
                    "labels are meaningless (recorded in _job.json and every row)", info.name)  # fmt: skip
    fs, root = storage.filesystem(config.output.uri, config.output.storage_options)
    plan, record, diff = prepare_output(config, info, fs, root, must_exist=resume)
    shards = int(record["plan"]["shards"])
    ledger = Ledger(fs, root)
    view = ledger.view()
    run = new_run_id(view)
    retry = ("all" if retry_all_errors else "retryable") if (retry_failed or retry_all_errors) else None
    queue = _queue(config, ledger, view, plan, record, rerun=rerun, retry=retry, run=run)
    result = JobResult(EXIT_OK, {"output": config.output.uri, "shards": shards, "shards_to_run": len(queue),
                                 "executor": config.execution.executor,
                                 "generation": int(record["plan"].get("generation", 0))})  # fmt: skip
    if diff is not None:
        result.summary["update"] = diff.counts()
    if queue:
        to_index = sum(len(w.videos) if w.video_ids is None else len(set(w.video_ids) & {v.video_id for v in w.videos})
                       for w in queue.pending)  # fmt: skip
        context = JobContext(config, info, decode_settings(config, info), config.output.uri,
                             videos=to_index, shards=shards)  # fmt: skip
        from videoindex.job.progress import JobProgress

        enabled = config.execution.progress if progress is None else progress
        run_record = {"started_at": started, "executor": config.execution.executor, "host": socket.gethostname(),
                      "pid": os.getpid(), "heartbeat_s": config.execution.heartbeat_s, "shards_to_run": len(queue)}  # fmt: skip
        with (
            Heartbeat(lambda r: ledger.write_run(run, r), lambda: run_record, config.execution.heartbeat_s),
            JobProgress(context.videos, shards, queue, enabled=enabled) as bar,
        ):
            executor_for(config.execution.executor).run(context, queue, bar)
        ledger.write_run(run, {**run_record, "heartbeat_at": time.time(), "finished_at": time.time(),
                               "committed": len(queue.committed), "failed": len(queue.failed)})  # fmt: skip
        # Readers of the finished run take it from here: a bounded number of requests.
        final = queue.checkpoint()
        compact_at_end(config, fs, root, final)
        result.summary["failed_shards"] = dict(queue.failed)
    committed = view.committed() | set(queue.committed)  # what earlier runs committed, and this one
    earlier = [view.state(s).counts for s in sorted(committed - set(queue.committed))]
    result.summary.update(summarize(earlier + list(queue.committed.values())))
    result.summary["shards_committed"] = len(committed)
    result.summary["shards_failed"] = len(queue.failed)
    result.summary["wall_s"] = round(time.time() - started, 2)
    if result.summary.get("failed_shards") or result.summary["shards_committed"] < shards:
        result.exit_code = EXIT_JOB_FAILED
    elif result.summary["videos_error"]:
        result.exit_code = EXIT_VIDEOS_FAILED
    return result
