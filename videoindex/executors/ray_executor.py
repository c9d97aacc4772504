"""The Ray executor (the only module that imports Ray): model actors take shards, videos decode as Ray
streaming tasks.

Flow: the driver's job (``job/run.py``) hands this executor a queue of shard attempts. It starts
``split.actors`` model actors (one ``ShardIndexer`` each) and gives each up to ``shards_per_actor``
shards at a time. An actor keeps ``decode_in_flight`` videos decoding as Ray generator tasks
(``decode_worker.decode_task``): a video is opened and probed once and streams its chunks of clips back,
at most ``decode_chunks_ahead`` ahead of the model (backpressure). With GPU actors the tasks run on the
actor's node, so no clip crosses the network. A lost actor or node costs an attempt: the shard goes back
to the queue and its deterministic files are overwritten by the next attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import ray

from videoindex.config import ExecutionConfig
from videoindex.executors.decode_worker import DECODE_PRIORITY_ENV, decode_task, warm_up
from videoindex.format.layout import shard_name
from videoindex.format.plans import VideoTask
from videoindex.job.shard import ShardIndexer, ShardWork
from videoindex.job.sizing import ExecutionSplit, execution_split
from videoindex.memory import DECODE_WORKER_ENV, trim_heap
from videoindex.stages.decode import TERMINAL, ClipBatch, DecodeSettings, VideoEvent, VideoFailure
from videoindex.stages.errors import DecodeError

log = logging.getLogger(__name__)


def decode_task_options(execution: ExecutionConfig, *, idle_priority: bool = False) -> dict[str, Any]:
    """Ray options of a decode task: its CPUs, Ray's retries of a dead worker, the worker's allocator and
    CPU priority (environment variables, so workers differing in either are never shared)."""
    env_vars = dict(DECODE_WORKER_ENV)
    if idle_priority:
        env_vars[DECODE_PRIORITY_ENV] = "idle"
    env = {"env_vars": env_vars}  # merged by Ray into the job's runtime_env
    return {"num_cpus": execution.decode_num_cpus, "max_retries": 2, "runtime_env": env}


def warm_decode_workers(execution: ExecutionConfig, count: int, *, idle_priority: bool = False,
                        settings: DecodeSettings | None = None) -> list[Any]:  # fmt: skip
    """Submit ``count`` warm-up tasks with the decode tasks' options (same worker pool), not awaited."""
    task = ray.remote(_warm_up_held).options(**decode_task_options(execution, idle_priority=idle_priority))
    return [task.remote(settings) for _ in range(count)]


WARM_UP_HOLD_S = 1.0  # a warm-up keeps its decode slot this long, so concurrent warm-ups get separate workers


def _warm_up_held(settings: DecodeSettings | None = None) -> int:
    """warm_up, holding the slot WARM_UP_HOLD_S from its start: Ray gives a queued task the worker its
    owner already leased, so warm-ups that ended at once would all run in the first worker to start. The
    imports count towards the hold: a hold after them kept the slots from the job's first decode tasks
    (1.3 s of a one-clip job)."""
    started = time.monotonic()
    pid = warm_up(settings)
    time.sleep(max(0.0, WARM_UP_HOLD_S - (time.monotonic() - started)))
    return pid


def decode_slots(split: ExecutionSplit, execution: ExecutionConfig, cluster_cpus: float, videos: int) -> int:
    """Decode tasks that can run at once beside the actors, capped by how many the actors keep in flight
    and by the videos left to decode: each warm worker imports the decoders (and torch) beside the actors'
    model loading, which a 1-video job on 2 cores pays about 2 s for when it warms a worker it never uses."""
    free = max(0.0, cluster_cpus - split.actors * split.num_cpus)
    most = split.actors * execution.shards_per_actor * execution.decode_in_flight
    return min(int(free / execution.decode_num_cpus + 1e-9), most, max(videos, 1))


class _Metrics:
    """Ray metrics (exported to the dashboard / Prometheus): clips/s, queue depth, latencies."""

    def __init__(self) -> None:
        from ray.util import metrics

        bounds = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
        self.clips = metrics.Counter("videoindex_clips", description="clips decoded and classified")
        self.videos = metrics.Counter(
            "videoindex_videos", description="videos finished", tag_keys=("status",)
        )
        self.queue = metrics.Gauge("videoindex_decode_in_flight", description="videos decoding")
        self.decode = metrics.Histogram("videoindex_decode_latency_s", description="decode seconds per chunk",
                                        boundaries=bounds)  # fmt: skip
        self.infer = metrics.Histogram("videoindex_infer_latency_s", description="model seconds per batch",
                                       boundaries=bounds)  # fmt: skip

    def event(self, event: VideoEvent, in_flight: int) -> None:
        self.queue.set(in_flight)
        if isinstance(event, ClipBatch):
            self.decode.observe(event.decode_s)
            self.clips.inc(len(event.clips))
        elif isinstance(event, TERMINAL):
            self.videos.inc(1, tags={"status": "error" if isinstance(event, VideoFailure) else "ok"})


# SUBMITTED_TO_WORKER: leased, on its way to a worker; not yet running (judged from when it runs).
_QUEUED = {"NIL", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "PENDING_OBJ_STORE_MEM_AVAIL",
           "PENDING_ARGS_FETCH", "GETTING_AND_PINNING_ARGS", "SUBMITTED_TO_WORKER"}  # fmt: skip
QUEUE_WAIT_FACTOR = 10  # a task queued longer than this many timeouts is judged hung all the same


def _seconds_left(ref: Any, timeout: float, *, since: float | None = None) -> float:
    """Seconds a decode task may still run before its next event: ``timeout`` minus how long it has been
    running (or, when ``since`` is later than its start, running since then).

    A task still queued (all decode CPUs busy) gets a full ``timeout`` more. 0 when Ray's state API
    (served by the dashboard) cannot tell: the task is then judged from when the actor began waiting.
    """
    try:
        from ray.util.state import get_task

        attempts = get_task(ref, timeout=10)
    except Exception as exc:  # no dashboard, state API down: fall back to the actor's clock
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


class RayDecodeStreams:
    """DecodeStreams over Ray generator tasks: ``decode_in_flight`` videos at once, consumed in order.

    The timeout covers each step of a video (its probe, each chunk): the clock starts when the actor
    waits for the next event, and, for a video's first event, not before Ray runs the task (a task queued
    behind busy CPUs is not hung; Ray's state API tells them apart). Past it the worker is killed and the
    video fails as ``timeout``. A worker that dies is retried by Ray (a streaming task resumes after the
    events already consumed), then the video fails as ``decoder_crash``; Ray's memory monitor killing it
    is ``out_of_memory``. ``cold_starts`` counts videos that were the first of a new worker process (or
    the first to import torch in it).
    """

    def __init__(self, settings: DecodeSettings, execution: ExecutionConfig, *, idle_priority: bool,
                 node_id: str | None, metrics: _Metrics | None = None) -> None:  # fmt: skip
        options = decode_task_options(execution, idle_priority=idle_priority)
        if node_id is not None:  # GPU actors: decode on the actor's node, no clip crosses the network
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        # max_calls is not an .options() key
        remote = ray.remote(max_calls=execution.decode_max_calls)(decode_task)
        self.task = remote.options(num_returns="streaming",
                                   _generator_backpressure_num_objects=execution.decode_chunks_ahead, **options)  # fmt: skip
        self.settings, self.execution, self.metrics = settings, execution, metrics
        self.idle_priority = idle_priority
        self.timeout = settings.decode.timeout_s

    def __call__(self, videos: Sequence[VideoTask]) -> Iterator[VideoEvent]:
        pending, window = deque(videos), deque()
        try:
            while pending or window:
                while pending and len(window) < self.execution.decode_in_flight:
                    video = pending.popleft()
                    window.append((video, self.task.remote(video, self.settings)))
                video, stream = window[0]
                for event in self._events(video, stream):
                    if self.metrics is not None:
                        self.metrics.event(event, len(window))
                    yield event
                window.popleft()
        finally:  # the consumer stopped early: stop the decodes it will never read
            for _, stream in window:
                ray.cancel(stream, force=True)

    def _events(self, video: VideoTask, stream: Any) -> Iterator[VideoEvent]:
        first = True
        while True:
            failure = self._wait(video, stream, first=first)
            if failure is not None:
                ray.cancel(stream, force=True)
                yield failure
                return
            try:
                ref = next(stream)
            except StopIteration:  # ended without its last event: cannot happen unless the task broke
                yield self._failure(video, "decoder_crash", "decode task ended without finishing the video")
                return
            try:
                event = ray.get(ref)
            except ray.exceptions.OutOfMemoryError as exc:  # Ray's memory monitor killed the worker
                yield self._failure(video, "out_of_memory", f"decode worker killed by Ray's memory monitor: "
                                    f"{_first_line(exc)}")  # fmt: skip
                return
            except (
                ray.exceptions.WorkerCrashedError
            ) as exc:  # died even after Ray's retries: the video is to blame
                yield self._failure(video, "decoder_crash", f"decode worker died: {_last_line(exc)}")
                return
            first = False
            yield event
            if isinstance(event, TERMINAL):
                return

    def _wait(self, video: VideoTask, stream: Any, *, first: bool) -> VideoFailure | None:
        """None when the stream's next event is ready; a timeout failure when it did not come in time."""
        at_head = time.time()
        ready, _ = ray.wait([stream], timeout=self.timeout)
        deadline = time.monotonic() + QUEUE_WAIT_FACTOR * self.timeout
        since = at_head if (self.idle_priority or not first) else None
        while (
            not ready
            and time.monotonic() < deadline
            and (left := _seconds_left(stream._generator_ref, self.timeout, since=since)) > 0
        ):
            ready, _ = ray.wait([stream], timeout=min(left, max(0.0, deadline - time.monotonic())))
        ready = ready or ray.wait([stream], timeout=0)[0]  # it may have come while we asked its state
        if ready:
            return None
        return self._failure(video, "timeout", f"decoding took longer than {self.timeout:g} s; worker killed")

    @staticmethod
    def _failure(video: VideoTask, error_type: str, message: str) -> VideoFailure:
        error = DecodeError(error_type, "decode", f"{video.uri}: {message}")
        return VideoFailure(video.video_id, error, size_bytes=video.size_bytes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class _TimedClassifier:
    """The actor's model on its own thread (``ModelThread``), each batch's latency into the metrics."""

    def __init__(self, model: Any, metrics: _Metrics | None = None) -> None:
        self.model, self.info, self.metrics = model, model.info, metrics

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
    """Holds one copy of the model; indexes whole shards and commits them (a ShardIndexer)."""

    def __init__(self, context: Any, split: ExecutionSplit) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from videoindex.stages.checkpoint import verified_model
        from videoindex.stages.model import ModelThread, VideoClassifier

        info = verified_model(context.model, context.config.model)  # cheap where the driver's files are
        self.metrics = _Metrics()
        # torch_threads set explicitly: Ray would set them to num_cpus, rounded down
        model = ModelThread(lambda: VideoClassifier(info, context.config.model), split.torch_threads)
        runtime = ray.get_runtime_context()
        node = runtime.get_node_id()
        self.where = {"node": node, "actor": runtime.get_actor_id(), "pid": os.getpid()}
        self.decode = RayDecodeStreams(context.settings, context.config.execution, metrics=self.metrics,
                                       idle_priority=split.decode_idle_priority,
                                       node_id=node if split.decode_on_actor_node else None)  # fmt: skip
        self.indexer = ShardIndexer(context, _TimedClassifier(model, self.metrics), self.decode,
                                    batch_size=split.batch_size, where=self.where)  # fmt: skip

    def index(self, work: ShardWork) -> dict[str, Any]:
        try:
            stats = self.indexer.index(work)
        finally:
            trim_heap()  # the shard's clips and tables are gone: keep the actor flat over thousands of shards
        warn_cold_starts(work.shard, tasks=stats["decode_tasks"], cold_starts=stats["decode_cold_starts"])
        return stats

    def progress(self) -> dict[str, int]:
        return self.indexer.counters.snapshot()


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
# - A task Ray's memory monitor kills is retried without end by default (task_oom_retries -1): a video
#   whose decode always outgrows the node ran until decode.timeout_s, again and again, and then failed as
#   a timeout. Two OOM retries, as for crashes, then the video is an out_of_memory row
#   (tests/test_ray_executor.py: test_a_decode_killed_by_rays_memory_monitor_is_out_of_memory).
IDLE_WORKER_KEEP_S = 600
DECODE_OOM_RETRIES = 2
RAY_SYSTEM_CONFIG: Mapping[str, Any] = MappingProxyType({
    "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_S * 1000,
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    "task_oom_retries": DECODE_OOM_RETRIES,
})  # fmt: skip


def ray_system_config() -> dict[str, Any]:
    """A fresh copy for ``ray.init(_system_config=...)``, which adds its own keys to the dict it gets."""
    return dict(RAY_SYSTEM_CONFIG)


def ray_node_env() -> dict[str, str]:
    """RAY_SYSTEM_CONFIG as the environment variables a node's raylet reads (set in cluster/Dockerfile)."""
    return {f"RAY_{k}": str(int(v)) if isinstance(v, bool) else str(v) for k, v in RAY_SYSTEM_CONFIG.items()}


def init_ray(execution: ExecutionConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = execution.address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = (
        {"address": address} if address else {"address": "local", "_system_config": ray_system_config()}
    )
    ray.init(**options, ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)


ACTOR_BACK_WAIT_S = 300.0  # a lost actor gets shards again after this long even if it never answered
PING_EVERY_S = 0.5


class _Dispatcher:
    """Hands the queue's shards to actors, settles their results into the queue.

    A lost actor (killed, its node gone) gets no shard until it answers a ping: Ray fails every call sent
    while the actor restarts at once, which would spend a shard's attempts in seconds.
    """

    def __init__(self, context: Any, split: ExecutionSplit, queue: Any) -> None:
        self.queue, self.limit = queue, context.config.execution.shards_per_actor
        actor_cls = ray.remote(ModelActor).options(
            num_cpus=split.num_cpus, num_gpus=split.num_gpus, max_restarts=-1, max_concurrency=self.limit + 1
        )
        self.actors = [actor_cls.remote(context, split) for _ in range(split.actors)]
        # Decode workers start (and import the decoders) while the actors load their model.
        slots = decode_slots(split, context.config.execution, ray.cluster_resources().get("CPU", 0),
                             context.videos)  # fmt: skip
        self.warm_ups = warm_decode_workers(
            context.config.execution,
            slots,
            idle_priority=split.decode_idle_priority,
            settings=context.settings,
        )
        self.load = [0] * len(self.actors)
        self.inflight: dict[Any, tuple[ShardWork, int]] = {}
        self.held: dict[int, tuple[Any, float, float]] = {}  # actor -> (ping or None, held since, next ping)
        self.last_counts: list[dict[str, int]] = [{"videos": 0, "clips": 0, "errors": 0} for _ in self.actors]

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

    def _submit(self) -> None:
        for n in sorted(range(len(self.actors)), key=lambda i: self.load[i]):
            while self.load[n] < self.limit and n not in self.held and (work := self.queue.pop()) is not None:
                self.inflight[self.actors[n].index.remote(work)] = (work, n)
                self.load[n] += 1

    def _settle(self, ref: Any) -> None:
        work, n = self.inflight.pop(ref)
        self.load[n] -= 1
        try:
            self.queue.done(work, ray.get(ref))
            return
        except ray.exceptions.RayActorError as exc:
            reason = f"actor lost: {type(exc).__name__}: {_first_line(exc) if str(exc) else ''}"
            self._hold(n)
        except ray.exceptions.RayTaskError as exc:
            reason = f"shard failed: {_last_line(exc)}"
        except ray.exceptions.RayError as exc:  # object lost, node died, ...: infrastructure, so retryable
            reason = f"{type(exc).__name__}: {_first_line(exc) if str(exc).strip() else ''}"
        self.queue.fail(work, reason)

    def counts(self) -> dict[str, int]:
        refs = [a.progress.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for n, ref in enumerate(refs):
            if ref in ready:
                with contextlib.suppress(ray.exceptions.RayError):
                    self.last_counts[n] = ray.get(ref)
        return {k: sum(c[k] for c in self.last_counts) for k in ("videos", "clips", "errors")}

    def run(self, bar: Any) -> None:
        while len(self.queue) or self.inflight:
            self._check_held()
            self._submit()
            ready = []
            if self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=PING_EVERY_S)
            else:
                time.sleep(PING_EVERY_S)  # every actor is restarting
            for ref in ready:
                self._settle(ref)
            bar.tick(self.counts)


class RayExecutor:
    """Run the queue on a Ray cluster (local Ray, or ``execution.address`` / RAY_ADDRESS)."""

    name = "ray"

    def run(self, context: Any, queue: Any, bar: Any) -> None:
        init_ray(context.config.execution)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        split = execution_split(context.config, ray.cluster_resources(), nodes, len(queue))
        log.info("execution: %s; decode tasks %g CPU", split, context.config.execution.decode_num_cpus)
        _Dispatcher(context, split, queue).run(bar)
