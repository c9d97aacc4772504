"""The thin Ray layer: model actors take shards from a driver-side queue; decode runs as Ray tasks.

Flow: the driver resolves the model and plans the job (``_job.json``, ``_plan/``), then hands shard ids
to model actors dynamically (``shards_per_actor`` each at a time). An actor reads its shard's rows of
the plan, keeps ``decode_in_flight`` decode tasks running anywhere in the cluster (only resized uint8
clips travel back), batches clips through its model copy, writes the shard's files and commits the
shard's marker last. A lost actor or node costs an attempt: the shard goes back to the queue and its
deterministic files are overwritten by the next attempt.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from videoindex import __version__, plan, storage
from videoindex.config import ExecutionConfig, JobConfig
from videoindex.errors import DecodeError
from videoindex.extract import ExtractRequest, ExtractResult, ExtractSettings, extract
from videoindex.jobfile import JOB_FILE, check_compatible, job_record, read_job, refuse_foreign_tables
from videoindex.ledger import Ledger
from videoindex.memory import DECODE_WORKER_ENV, trim_heap
from videoindex.model import ModelInfo, VideoClassifier, resolve_model
from videoindex.resume import failed_videos
from videoindex.schema import shard_name
from videoindex.shard import index_shard, replace_videos, stats_from_tables
from videoindex.sizing import ExecutionSplit, execution_split
from videoindex.status import summarize
from videoindex.write import file_metadata, read_shard_tables, write_shard_tables

log = logging.getLogger(__name__)

EXIT_OK, EXIT_VIDEOS_FAILED, EXIT_JOB_FAILED = 0, 1, 2


@dataclass
class JobResult:
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActorJob:
    """What every model actor needs; built once on the driver."""

    config: JobConfig
    model: ModelInfo
    settings: ExtractSettings
    output_root: str
    split: ExecutionSplit  # actors, their CPUs/GPUs, threads and batch size for this cluster


def decode_task_options(execution: ExecutionConfig) -> dict[str, Any]:
    """Ray options of a decode task: its CPUs, Ray's retries of a dead worker, the worker's allocator."""
    env = {"env_vars": dict(DECODE_WORKER_ENV)}  # merged by Ray into the job's runtime_env
    return {"num_cpus": execution.decode_num_cpus, "max_retries": 2, "runtime_env": env}


def _extract_task(request: ExtractRequest, settings: ExtractSettings) -> ExtractResult:
    import torch

    torch.set_num_threads(1)
    return extract(request, settings)


class _Metrics:
    """Ray metrics (exported to the dashboard / Prometheus): clips/s, queue depth, latencies."""

    def __init__(self) -> None:
        from ray.util import metrics

        bounds = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
        self.clips = metrics.Counter("videoindex_clips", description="clips decoded and classified")
        self.videos = metrics.Counter(
            "videoindex_videos", description="videos finished", tag_keys=("status",)
        )
        self.queue = metrics.Gauge("videoindex_decode_in_flight", description="decode tasks in flight")
        self.decode = metrics.Histogram(
            "videoindex_decode_latency_s", description="decode seconds per task", boundaries=bounds
        )
        self.infer = metrics.Histogram(
            "videoindex_infer_latency_s", description="model seconds per batch", boundaries=bounds
        )


class _Counters:
    """Progress counters of one actor, bumped by its shard threads and read by the driver."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"videos": 0, "clips": 0, "errors": 0, "chunks": 0}

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, delta in deltas.items():
                self.values[key] += delta

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


_QUEUED = {"NIL", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "PENDING_OBJ_STORE_MEM_AVAIL",
           "PENDING_ARGS_FETCH", "GETTING_AND_PINNING_ARGS"}  # fmt: skip
QUEUE_WAIT_FACTOR = 10  # a task queued longer than this many timeouts is judged hung all the same


def _seconds_left(ref: Any, timeout: float) -> float:
    """Seconds a decode task may still run: ``timeout`` minus how long it has really been running.

    A task still queued (all decode CPUs busy) gets a full ``timeout`` more. 0 when Ray's state API
    (served by the dashboard) cannot tell: the task is then judged from when it reached the window's head.
    """
    try:
        from ray.util.state import get_task

        attempts = get_task(ref, timeout=10)
    except Exception as exc:  # no dashboard, state API down: fall back to the window's clock
        log.debug("task state unavailable (%s): %s", type(exc).__name__, exc)
        return 0.0
    if not attempts:
        return 0.0
    attempts = attempts if isinstance(attempts, list) else [attempts]
    last = max(attempts, key=lambda a: a.attempt_number)  # the state API returns attempts in no set order
    if last.state in _QUEUED:
        return timeout
    if last.state.startswith("RUNNING") and last.start_time_ms:
        return timeout - (time.time() - last.start_time_ms / 1000)
    return 0.0


def ray_extract_window(
    settings: ExtractSettings, config: JobConfig, counters: _Counters, metrics: _Metrics | None = None
):
    """A run_extracts for index_shard: a bounded, ordered window of Ray decode tasks with a timeout.

    A task's timeout clock starts when Ray starts running it (Ray's state API tells a task still queued
    behind busy CPUs from a hung one; without the dashboard, from when it reaches the head of the window);
    past it, the worker is killed and the video fails as ``timeout``.
    A worker that dies (crash, os._exit) is retried by Ray for system failures, then recorded as
    ``decoder_crash``.
    """
    remote = ray.remote(max_calls=config.execution.decode_max_calls)(_extract_task)  # not an .options() key
    task = remote.options(**decode_task_options(config.execution))
    timeout = config.decode.timeout_s

    def run(queue: deque) -> Iterator[ExtractResult]:
        window: deque = deque()
        while queue or window:
            while queue and len(window) < config.execution.decode_in_flight:
                request = queue.popleft()
                window.append((request, task.remote(request, settings)))
            request, ref = window.popleft()
            ready, _ = ray.wait([ref], timeout=timeout)
            deadline = time.monotonic() + QUEUE_WAIT_FACTOR * timeout
            while not ready and time.monotonic() < deadline and (left := _seconds_left(ref, timeout)) > 0:
                ready, _ = ray.wait([ref], timeout=min(left, max(0.0, deadline - time.monotonic())))
            ready = ready or ray.wait([ref], timeout=0)[0]  # it may have finished while we asked its state
            if not ready:
                ray.cancel(ref, force=True)
                error = DecodeError(
                    "timeout",
                    "decode",
                    f"{request.video.uri}: decoding took longer than {timeout:g} s; worker killed",
                )
                result = ExtractResult(request=request, error=error)
            else:
                try:
                    result = ray.get(ref)
                except ray.exceptions.OutOfMemoryError as exc:
                    # Ray's memory monitor killed the worker: the node ran low before decode.max_memory_mb.
                    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    result = ExtractResult(
                        request=request,
                        error=DecodeError(
                            "out_of_memory",
                            "decode",
                            f"{request.video.uri}: decode worker killed by Ray's memory monitor: {text}",
                        ),
                    )
                except ray.exceptions.WorkerCrashedError as exc:
                    # The process died (segfault, os._exit, OOM kill) even after Ray's retries: the video
                    # is to blame. An exception raised by extract() itself is a bug or a broken
                    # environment, not a bad video: it propagates and fails the shard attempt.
                    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    result = ExtractResult(
                        request=request,
                        error=DecodeError(
                            "decoder_crash", "decode", f"{request.video.uri}: decode worker died: {text}"
                        ),
                    )
            first = request.chunk == 0
            counters.add(chunks=1, clips=len(result.clips), videos=int(first),
                         errors=int(first and result.error is not None))  # fmt: skip
            if metrics is not None:
                metrics.queue.set(len(window))
                metrics.decode.observe(result.decode_s)
                if result.clips:
                    metrics.clips.inc(len(result.clips))
                if first:
                    metrics.videos.inc(1, tags={"status": "error" if result.error else "ok"})
            yield result

    return run


class _LockedClassifier:
    """Lets two shard threads of one actor share one model copy, one batch at a time."""

    def __init__(self, classifier: VideoClassifier, metrics: _Metrics | None = None) -> None:
        self.classifier = classifier
        self.info = classifier.info
        self.lock = threading.Lock()
        self.metrics = metrics

    def __call__(self, clips: Any) -> Any:
        with self.lock:
            started = time.perf_counter()
            out = self.classifier(clips)
            if self.metrics is not None:
                self.metrics.infer.observe(time.perf_counter() - started)
            return out


class ModelActor:
    """Holds one copy of the model; indexes whole shards and commits them."""

    def __init__(self, job: ActorJob) -> None:
        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(job.split.torch_threads)  # Ray would set it to num_cpus, rounded down
        self.job = job
        info = resolve_model(job.config.model, job.config.preprocess)
        if info.weights_sha256 != job.model.weights_sha256:
            raise RuntimeError(
                f"model weights on this node differ from the driver's ({info.weights_sha256} != {job.model.weights_sha256})"
            )
        self.metrics = _Metrics()
        self.classifier = _LockedClassifier(VideoClassifier(info, job.config.model), self.metrics)
        self.fs, self.root = storage.filesystem(job.output_root, job.config.output.storage_options)
        self.ledger = Ledger(self.fs, self.root)
        self.counters = _Counters()
        self.metadata = file_metadata(info, __version__)

    def index(self, shard: int, attempt: int, video_ids: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Index a shard (or only ``video_ids`` of a committed shard), write it, commit it."""
        try:
            return self._index(shard, attempt, video_ids)
        finally:
            trim_heap()  # the shard's clips and tables are gone: keep the actor flat over thousands of shards

    def _index(self, shard: int, attempt: int, video_ids: tuple[str, ...] | None) -> dict[str, Any]:
        context = ray.get_runtime_context()
        where = {"node": context.get_node_id(), "actor": context.get_actor_id(), "pid": os.getpid()}
        self.ledger.started(
            shard, attempt, {**where, "videos_retried": len(video_ids) if video_ids else None}
        )
        started = time.time()
        tasks = plan.shard_tasks(plan.read_plan(self.fs, self.root, shard))
        if video_ids is not None:
            previous = read_shard_tables(self.fs, self.root, shard)
            tasks = [t for t in tasks if t.video_id in set(video_ids)]
        log.info("[shard %s] attempt %d: %d videos", shard_name(shard), attempt, len(tasks))
        run = ray_extract_window(self.job.settings, self.job.config, self.counters, self.metrics)
        out = index_shard(
            tasks,
            self.job.settings,
            self.classifier,
            batch_size=self.job.split.batch_size,
            run_extracts=run,
        )
        tables = out.tables
        if video_ids is not None:
            tables = replace_videos(previous, out.tables, video_ids)
            # Readers keep the old rows while the videos are re-indexed, then stop seeing the shard for
            # the few writes until its new files are committed (a crash here leaves it to a full rerun).
            self.ledger.uncommit(shard)
        written = write_shard_tables(self.fs, self.root, shard, tables, metadata=self.metadata,
                                     clips_row_group_size=self.job.config.output.clips_row_group_size)  # fmt: skip
        stats = {**out.stats, **stats_from_tables(tables), "shard": shard, "attempt": attempt, "started_at": started,
                 "finished_at": time.time(), "bytes_written": written, **where}  # fmt: skip
        self.ledger.commit(shard, stats)
        log.info("[shard %s] committed: %s", shard_name(shard), stats)
        return stats

    def progress(self) -> dict[str, int]:
        return self.counters.snapshot()


def _resolve_plan(config: JobConfig, info: ModelInfo, fs: Any, root: str, *, must_exist: bool) -> int:
    """Write (or check and reuse) _job.json and the plan; returns the number of shards."""
    storage.check_output_writable(fs, root, config.output.uri)  # fail in seconds, before listing the input
    existing = read_job(fs, root)
    if existing is not None:
        check_compatible(existing, config, info, config.output.uri)
        return int(existing["plan"]["shards"])
    if must_exist:
        raise FileNotFoundError(f"{config.output.uri} has no {JOB_FILE}: nothing to resume")
    refuse_foreign_tables(fs, root, config.output.uri)
    table = plan.make_plan(plan.list_inputs(config.input), config.output.shard_size)
    shards = len(plan.shard_ids(table))
    # The plan first: _job.json is the marker that the job exists, so it must never point at a missing plan.
    plan.write_plan(fs, root, table, config.output.shard_size)
    storage.write_json(fs, storage.join(root, JOB_FILE), job_record(config, info, table.num_rows, shards))
    log.info("planned %d videos in %d shards", table.num_rows, shards)
    return shards


def _init_ray(config: JobConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = config.execution.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)


class _Dispatcher:
    """Hands shards to actors from a queue, retries infrastructure failures, records every attempt."""

    def __init__(self, job: ActorJob, ledger: Ledger) -> None:
        self.job = job
        self.ledger = ledger
        self.actor_cls = ray.remote(ModelActor).options(
            num_cpus=job.split.num_cpus,
            num_gpus=job.split.num_gpus,
            max_restarts=-1,
            max_concurrency=job.config.execution.shards_per_actor + 1,
        )
        self.actors = [self.actor_cls.remote(job) for _ in range(job.split.actors)]
        self.load = [0] * len(self.actors)
        self.inflight: dict[Any, tuple[int, int, int, tuple[str, ...] | None]] = {}
        self.committed: list[dict[str, Any]] = []
        self.failed: dict[int, str] = {}
        self.first_attempt: dict[int, int] = {}

    def _submit(self, queue: deque) -> None:
        limit = self.job.config.execution.shards_per_actor
        for n in sorted(range(len(self.actors)), key=lambda i: self.load[i]):
            while queue and self.load[n] < limit:
                shard, attempt, video_ids = queue.popleft()
                self.first_attempt.setdefault(shard, attempt)
                self.inflight[self.actors[n].index.remote(shard, attempt, video_ids)] = (
                    shard,
                    attempt,
                    n,
                    video_ids,
                )
                self.load[n] += 1

    def _settle(self, ref: Any, queue: deque) -> None:
        shard, attempt, n, video_ids = self.inflight.pop(ref)
        self.load[n] -= 1
        try:
            self.committed.append(ray.get(ref))
            return
        except ray.exceptions.RayActorError as exc:
            reason = f"actor lost: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        except ray.exceptions.RayTaskError as exc:
            reason = f"shard failed: {str(exc).strip().splitlines()[-1]}"
        except ray.exceptions.RayError as exc:  # object lost, node died, ...: infrastructure, so retryable
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        # max_attempts counts this run's attempts: a resume gives every shard a fresh budget.
        tries = attempt - self.first_attempt.setdefault(shard, attempt) + 1
        final = tries >= self.job.config.execution.max_attempts
        log.warning(
            "[shard %s] attempt %d failed (%s)%s",
            shard_name(shard),
            attempt,
            reason,
            "; giving up" if final else "; retrying",
        )
        self.ledger.attempt_failed(shard, attempt, reason, final=final)
        if final:
            self.failed[shard] = reason
        else:
            queue.append((shard, attempt + 1, video_ids))

    def progress(self) -> dict[str, int]:
        total = {"videos": 0, "clips": 0, "errors": 0}
        refs = [a.progress.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for ref in ready:
            try:
                for key in total:
                    total[key] += ray.get(ref)[key]
            except ray.exceptions.RayError:
                pass
        return total

    def run(self, queue: deque, on_tick: Any) -> None:
        while queue or self.inflight:
            self._submit(queue)
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                self._settle(ref, queue)
            on_tick(self)


def _pending_shards(ledger: Ledger, shards: int, *, rerun: bool) -> deque:
    view = ledger.view()
    done = set() if rerun else view.committed()
    return deque((s, view.state(s).attempts + 1, None) for s in range(shards) if s not in done)


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
    shards = _resolve_plan(config, info, fs, root, must_exist=resume)
    ledger = Ledger(fs, root)
    queue = _pending_shards(ledger, shards, rerun=rerun)
    if retry_failed or retry_all_errors:
        view = ledger.view()
        for shard, ids in failed_videos(fs, root, view.committed(), all_errors=retry_all_errors).items():
            queue.append((shard, view.state(shard).attempts + 1, ids))
    settings = ExtractSettings(
        sampling=config.sampling, decode=config.decode, preprocess=info.preprocess, clip_len=info.num_frames,
        storage_options=dict(config.input.storage_options), thumbnails=config.output.thumbnails,
    )  # fmt: skip
    result = JobResult(EXIT_OK, {"output": config.output.uri, "shards": shards, "shards_to_run": len(queue)})
    if queue:
        _init_ray(config)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        split = execution_split(config, ray.cluster_resources(), nodes, len(queue))
        log.info("execution: %s; decode tasks %g CPU", split, config.execution.decode_num_cpus)
        job = ActorJob(
            config=config, model=info, settings=settings, output_root=config.output.uri, split=split
        )
        dispatcher = _Dispatcher(job, ledger)
        from videoindex.progress import JobProgress

        with JobProgress(
            config, ledger, shards, enabled=config.execution.progress if progress is None else progress
        ) as bar:
            dispatcher.run(queue, bar.tick)
        result.summary["failed_shards"] = dict(dispatcher.failed)
    result.summary.update(summarize(ledger))
    result.summary["wall_s"] = round(time.time() - started, 2)
    if result.summary.get("failed_shards") or result.summary["shards_committed"] < shards:
        result.exit_code = EXIT_JOB_FAILED
    elif result.summary["videos_error"]:
        result.exit_code = EXIT_VIDEOS_FAILED
    return result
