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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import ray

from videoindex import __version__, plan, storage
from videoindex.config import ExecutionConfig, JobConfig
from videoindex.errors import DecodeError
from videoindex.extract import (
    DECODE_PRIORITY_ENV,
    ExtractRequest,
    ExtractResult,
    ExtractSettings,
    extract_task,
    warm_decode_worker,
)
from videoindex.jobfile import JOB_FILE, check_compatible, job_record, read_job, refuse_foreign_tables
from videoindex.ledger import Ledger
from videoindex.memory import DECODE_WORKER_ENV, trim_heap
from videoindex.model import ModelInfo, ModelThread, VideoClassifier, resolve_model
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


def decode_task_options(execution: ExecutionConfig, *, idle_priority: bool = False) -> dict[str, Any]:
    """Ray options of a decode task: its CPUs, Ray's retries of a dead worker, the worker's allocator and
    CPU priority (environment variables, so workers differing in either are never shared)."""
    env_vars = dict(DECODE_WORKER_ENV)
    if idle_priority:
        env_vars[DECODE_PRIORITY_ENV] = "idle"
    env = {"env_vars": env_vars}  # merged by Ray into the job's runtime_env
    return {"num_cpus": execution.decode_num_cpus, "max_retries": 2, "runtime_env": env}


def warm_decode_workers(execution: ExecutionConfig, count: int, *, idle_priority: bool = False) -> list[Any]:
    """Submit ``count`` warm-up tasks with the decode tasks' options (same worker pool), not awaited."""
    task = ray.remote(warm_decode_worker).options(
        **decode_task_options(execution, idle_priority=idle_priority)
    )
    return [task.remote() for _ in range(count)]


def decode_slots(split: ExecutionSplit, execution: ExecutionConfig, cluster_cpus: float) -> int:
    """Decode tasks that can run at once beside the actors, capped by how many the actors keep in flight."""
    free = max(0.0, cluster_cpus - split.actors * split.num_cpus)
    most = split.actors * execution.shards_per_actor * execution.decode_in_flight
    return min(int(free / execution.decode_num_cpus + 1e-9), most)


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


# SUBMITTED_TO_WORKER: leased, on its way to a worker; not yet running (judged from when it runs).
_QUEUED = {"NIL", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "PENDING_OBJ_STORE_MEM_AVAIL",
           "PENDING_ARGS_FETCH", "GETTING_AND_PINNING_ARGS", "SUBMITTED_TO_WORKER"}  # fmt: skip
QUEUE_WAIT_FACTOR = 10  # a task queued longer than this many timeouts is judged hung all the same


def _seconds_left(ref: Any, timeout: float, *, since: float | None = None) -> float:
    """Seconds a decode task may still run: ``timeout`` minus how long it has really been running (or,
    when ``since`` is later than its start, running since then).

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
        return timeout - (time.time() - max(last.start_time_ms / 1000, since or 0.0))
    return 0.0


class DecodeWindow:
    """A run_extracts for index_shard: a bounded, ordered window of Ray decode tasks with a timeout.

    A task's timeout clock starts when Ray starts running it (Ray's state API tells a task still queued
    behind busy CPUs from a hung one; without the dashboard, from when it reaches the head of the window);
    past it, the worker is killed and the video fails as ``timeout``. With ``idle_priority`` the clock
    starts no earlier than the head of the window: an idle-priority decode may be starved of CPU while the
    model is busy, and gets it once the actor waits for it.
    A worker that dies (crash, os._exit) is retried by Ray for system failures, then recorded as
    ``decoder_crash``. ``cold_starts`` counts tasks that were the first in a new worker process.
    """

    def __init__(
        self,
        settings: ExtractSettings,
        config: JobConfig,
        counters: _Counters,
        metrics: _Metrics | None = None,
        *,
        idle_priority: bool = False,
    ) -> None:
        # max_calls is not an .options() key
        remote = ray.remote(max_calls=config.execution.decode_max_calls)(extract_task)
        self.task = remote.options(**decode_task_options(config.execution, idle_priority=idle_priority))
        self.idle_priority = idle_priority
        self.settings, self.config, self.counters, self.metrics = settings, config, counters, metrics
        self.tasks = 0
        self.cold_starts = 0

    def __call__(self, queue: deque) -> Iterator[ExtractResult]:
        window: deque = deque()
        in_flight = self.config.execution.decode_in_flight
        while queue or window:
            while queue and len(window) < in_flight:
                request = queue.popleft()
                window.append((request, self.task.remote(request, self.settings)))
            request, ref = window.popleft()
            result = self._result(request, ref)
            self.tasks += 1
            self.cold_starts += int(result.cold_start)
            self._count(result, queued=len(window))
            yield result

    def _result(self, request: ExtractRequest, ref: Any) -> ExtractResult:
        timeout = self.config.decode.timeout_s
        at_head = time.time()
        ready, _ = ray.wait([ref], timeout=timeout)
        deadline = time.monotonic() + QUEUE_WAIT_FACTOR * timeout
        since = at_head if self.idle_priority else None
        while (
            not ready
            and time.monotonic() < deadline
            and (left := _seconds_left(ref, timeout, since=since)) > 0
        ):
            ready, _ = ray.wait([ref], timeout=min(left, max(0.0, deadline - time.monotonic())))
        ready = ready or ray.wait([ref], timeout=0)[0]  # it may have finished while we asked its state
        uri = request.video.uri
        if not ready:
            ray.cancel(ref, force=True)
            message = f"{uri}: decoding took longer than {timeout:g} s; worker killed"
            return ExtractResult(request=request, error=DecodeError("timeout", "decode", message))
        try:
            return ray.get(ref)
        except ray.exceptions.OutOfMemoryError as exc:
            # Ray's memory monitor killed the worker: the node ran low before decode.max_memory_mb.
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"{uri}: decode worker killed by Ray's memory monitor: {text}"
            return ExtractResult(request=request, error=DecodeError("out_of_memory", "decode", message))
        except ray.exceptions.WorkerCrashedError as exc:
            # The process died (segfault, os._exit, OOM kill) even after Ray's retries: the video is to
            # blame. An exception raised by extract() itself is a bug or a broken environment, not a bad
            # video: it propagates and fails the shard attempt.
            text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            message = f"{uri}: decode worker died: {text}"
            return ExtractResult(request=request, error=DecodeError("decoder_crash", "decode", message))

    def _count(self, result: ExtractResult, queued: int) -> None:
        first = result.request.chunk == 0
        self.counters.add(chunks=1, clips=len(result.clips), videos=int(first),
                          errors=int(first and result.error is not None))  # fmt: skip
        if self.metrics is not None:
            self.metrics.queue.set(queued)
            self.metrics.decode.observe(result.decode_s)
            if result.clips:
                self.metrics.clips.inc(len(result.clips))
            if first:
                self.metrics.videos.inc(1, tags={"status": "error" if result.error else "ok"})


class _TimedClassifier:
    """The actor's model on its own thread (``ModelThread``), each batch's latency into the metrics."""

    def __init__(self, model: ModelThread, metrics: _Metrics | None = None) -> None:
        self.model = model
        self.info = model.info
        self.metrics = metrics

    def __call__(self, clips: Any) -> Any:
        started = time.perf_counter()
        out = self.model(clips)
        if self.metrics is not None:
            self.metrics.infer.observe(time.perf_counter() - started)
        return out


def warn_cold_starts(shard: int, *, tasks: int, cold_starts: int) -> bool:
    """Say so (and return True) when most of a shard's decode tasks started a new worker process: Ray is
    killing idle decode workers, and each start costs seconds of CPU."""
    if cold_starts <= max(2, tasks // 4):
        return False
    log.warning(
        "[shard %s] %d of %d decode tasks started a new worker process (seconds of CPU each): Ray kills idle "
        "workers after 1 s idle by default; set RAY_idle_worker_killing_time_threshold_ms=%d on every node "
        "(cluster/README.md)",
        shard_name(shard), cold_starts, tasks, IDLE_WORKER_KEEP_S * 1000,
    )  # fmt: skip
    return True


class ModelActor:
    """Holds one copy of the model; indexes whole shards and commits them."""

    def __init__(self, job: ActorJob) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.job = job
        info = resolve_model(job.config.model, job.config.preprocess)
        if info.weights_sha256 != job.model.weights_sha256:
            raise RuntimeError(
                f"model weights on this node differ from the driver's ({info.weights_sha256} != {job.model.weights_sha256})"
            )
        self.metrics = _Metrics()
        # torch_threads set explicitly: Ray would set them to num_cpus, rounded down
        model = ModelThread(lambda: VideoClassifier(info, job.config.model), job.split.torch_threads)
        self.classifier = _TimedClassifier(model, self.metrics)
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
        window = DecodeWindow(self.job.settings, self.job.config, self.counters, self.metrics,
                              idle_priority=self.job.split.decode_idle_priority)  # fmt: skip
        out = index_shard(
            tasks,
            self.job.settings,
            self.classifier,
            batch_size=self.job.split.batch_size,
            run_extracts=window,
        )
        warn_cold_starts(shard, tasks=window.tasks, cold_starts=window.cold_starts)
        tables = out.tables
        if video_ids is not None:
            tables = replace_videos(previous, out.tables, video_ids)
            # Readers keep the old rows while the videos are re-indexed, then stop seeing the shard for
            # the few writes until its new files are committed (a crash here leaves it to a full rerun).
            self.ledger.uncommit(shard)
        written = write_shard_tables(self.fs, self.root, shard, tables, metadata=self.metadata,
                                     clips_row_group_size=self.job.config.output.clips_row_group_size)  # fmt: skip
        stats = {**out.stats, **stats_from_tables(tables), "shard": shard, "attempt": attempt, "started_at": started,
                 "finished_at": time.time(), "bytes_written": written, "decode_tasks": window.tasks,
                 "decode_cold_starts": window.cold_starts, **where}  # fmt: skip
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


# How Ray's worker pool treats decode workers, for the local Ray videoindex starts (cluster nodes: the
# same settings as environment variables, ray_node_env(), in cluster/Dockerfile).
# - Ray kills idle workers past num_workers_soft_limit (default: the node's CPUs) once idle for
#   idle_worker_killing_time_threshold_ms (1 s). A decode worker idles while the model works through the
#   chunk it decoded, so beside a CPU model actor nearly every decode task started a fresh worker: ~5 CPU s
#   of start-up and imports against ~2 s of decoding (benchmarks/README.md). Idle workers are kept for
#   IDLE_WORKER_KEEP_S instead. (Raising the soft limit also keeps them, but Ray then reads it as room for
#   workers it starts for queued tasks: two idle extra workers per burst, measured.)
# - Workers Ray starts ahead of need would idle all job long: each wakes 100 times a second and takes CPU
#   from the model's threads, so none are prestarted (warm_decode_workers instead).
IDLE_WORKER_KEEP_S = 600
RAY_SYSTEM_CONFIG: Mapping[str, Any] = MappingProxyType({
    "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_S * 1000,
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
})  # fmt: skip


def ray_system_config() -> dict[str, Any]:
    """A fresh copy for ``ray.init(_system_config=...)``, which adds its own keys to the dict it gets."""
    return dict(RAY_SYSTEM_CONFIG)


def ray_node_env() -> dict[str, str]:
    """RAY_SYSTEM_CONFIG as the environment variables a node's raylet reads (set in cluster/Dockerfile)."""
    return {f"RAY_{k}": str(int(v)) if isinstance(v, bool) else str(v) for k, v in RAY_SYSTEM_CONFIG.items()}


def _init_ray(config: JobConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = config.execution.address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = (
        {"address": address} if address else {"address": "local", "_system_config": ray_system_config()}
    )
    ray.init(**options, ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)


ACTOR_BACK_WAIT_S = 300.0  # a lost actor gets shards again after this long even if it never answered
PING_EVERY_S = 0.5


class _Dispatcher:
    """Hands shards to actors from a queue, retries infrastructure failures, records every attempt.

    A lost actor (killed, its node gone) gets no shard until it answers a ping: Ray fails every call sent
    while the actor restarts at once, which would spend a shard's attempts in seconds.
    """

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
        # Decode workers start (and import torch and the decoders) while the actors load their model.
        slots = decode_slots(job.split, job.config.execution, ray.cluster_resources().get("CPU", 0))
        self.warm_ups = warm_decode_workers(
            job.config.execution, slots, idle_priority=job.split.decode_idle_priority
        )
        self.load = [0] * len(self.actors)
        self.inflight: dict[Any, tuple[int, int, int, tuple[str, ...] | None]] = {}
        self.committed: list[dict[str, Any]] = []
        self.failed: dict[int, str] = {}
        self.first_attempt: dict[int, int] = {}
        self.held: dict[int, tuple[Any, float, float]] = {}  # actor -> (ping or None, held since, next ping)

    def _hold(self, n: int) -> None:
        if n not in self.held:
            now = time.monotonic()
            self.held[n] = (self.actors[n].progress.remote(), now, now)

    def _check_held(self) -> None:
        now = time.monotonic()
        for n, (ping, since, next_ping) in list(self.held.items()):
            if now - since > ACTOR_BACK_WAIT_S:
                log.warning(
                    "model actor %d did not come back in %g s; sending it shards again", n, ACTOR_BACK_WAIT_S
                )
                del self.held[n]
            elif ping is None:
                if now >= next_ping:
                    self.held[n] = (self.actors[n].progress.remote(), since, now)
            elif ray.wait([ping], timeout=0)[0]:
                try:
                    ray.get(ping)
                    del self.held[n]  # restarted: its model is loaded
                except ray.exceptions.RayError:  # still restarting
                    self.held[n] = (None, since, now + PING_EVERY_S)

    def _submit(self, queue: deque) -> None:
        limit = self.job.config.execution.shards_per_actor
        for n in sorted(range(len(self.actors)), key=lambda i: self.load[i]):
            while queue and self.load[n] < limit and n not in self.held:
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
            self._hold(n)
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
            self._check_held()
            self._submit(queue)
            ready = []
            if self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=PING_EVERY_S)
            else:
                time.sleep(PING_EVERY_S)  # every actor is restarting
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
