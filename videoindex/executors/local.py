"""The local executor: shards in this process, decoding in worker processes. Starts no Ray at all.

The same crash isolation, timeout and memory semantics as the Ray executor's decode tasks: each worker
is a subprocess running ``decode_worker.serve`` (one video at a time, events sent back over a
pipe, a send blocking until the executor reads it: one chunk of backpressure); a worker that sends
nothing for ``decode.timeout_s`` is killed and its video fails as ``timeout``; a worker that dies is
replaced and its video retried twice (the events already consumed are skipped), then it fails as
``decoder_crash``; ``decode.max_memory_mb`` caps each step inside the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from videoindex.executors.decode_worker import DECODE_PRIORITY_ENV
from videoindex.format.plans import VideoTask
from videoindex.job.shard import ShardIndexer
from videoindex.job.sizing import local_split
from videoindex.memory import DECODE_WORKER_ENV, trim_heap
from videoindex.stages.decode import TERMINAL, DecodeSettings, VideoEvent, VideoFailure
from videoindex.stages.errors import DecodeError

log = logging.getLogger(__name__)

CRASH_RETRIES = 2  # as Ray's max_retries for a decode task whose worker died
CLOSE_WAIT_S = 5.0


def _python_path() -> str:
    """PYTHONPATH that imports this very videoindex in the worker, wherever it was imported from here."""
    import videoindex

    root = os.path.dirname(os.path.dirname(os.path.abspath(videoindex.__file__)))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


class _Worker:
    """One decode process (``python -m videoindex.executors.decode_worker``) and a socket pair to it.

    A plain subprocess rather than multiprocessing's spawn: spawn re-imports the caller's main module,
    which breaks any script that calls run_job without a ``__main__`` guard.
    """

    def __init__(self, settings: DecodeSettings, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "videoindex.executors.decode_worker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env={**os.environ, **env, "PYTHONPATH": _python_path()},
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(settings)

    def exit_code(self) -> int | None:
        """The process's exit code; after its pipe closed, wait a moment for it to be reaped."""
        try:
            return self.process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(CLOSE_WAIT_S)
        self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit (it does at once, skipping interpreter teardown)."""
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def close(self) -> None:
        self.stop()
        try:
            self.process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(CLOSE_WAIT_S)
        self.conn.close()


@dataclass
class _Stream:
    """A video being decoded by a worker; ``consumed`` events were already handed on."""

    video: VideoTask
    worker: _Worker
    consumed: int = 0
    skip: int = 0  # events to drop after a retry (the consumer has them already)
    tries: int = 1


class LocalDecodePool:
    """DecodeStreams over worker processes: up to ``workers`` videos decode at once, consumed in order."""

    def __init__(
        self, settings: DecodeSettings, *, workers: int, timeout_s: float, idle_priority: bool
    ) -> None:
        self.settings, self.timeout_s = settings, timeout_s
        self.env = {**DECODE_WORKER_ENV, "OMP_NUM_THREADS": "1"}
        if idle_priority:
            self.env[DECODE_PRIORITY_ENV] = "idle"
        self.idle = [self._spawn() for _ in range(max(1, workers))]  # they start while the model loads

    def _spawn(self) -> _Worker:
        return _Worker(self.settings, self.env)

    def __call__(self, videos: Sequence[VideoTask]) -> Iterator[VideoEvent]:
        pending, active = deque(videos), deque()
        try:
            while pending or active:
                while pending and self.idle:
                    active.append(self._start(pending.popleft(), self.idle.pop()))
                stream = active[0]
                event = self._next(stream)
                if event is None:  # the worker died and the video was sent to a fresh one
                    continue
                if stream.skip:
                    stream.skip -= 1
                    continue
                stream.consumed += 1
                yield event
                if isinstance(event, TERMINAL):
                    active.popleft()
                    self.idle.append(stream.worker)
        finally:  # the consumer stopped early (an exception): workers mid-video cannot be reused
            for stream in active:
                stream.worker.kill()
                self.idle.append(self._spawn())

    def _start(self, video: VideoTask, worker: _Worker) -> _Stream:
        try:
            worker.conn.send(video)
        except OSError:  # the idle worker died (killed from outside): a fresh one takes the video
            log.warning("decode worker %d died while idle (exit code %s); starting another",
                        worker.process.pid, worker.exit_code())  # fmt: skip
            worker.kill()
            worker = self._spawn()
            worker.conn.send(video)
        return _Stream(video, worker)

    def _next(self, stream: _Stream) -> VideoEvent | None:
        if not stream.worker.conn.poll(self.timeout_s):
            return self._replace(stream, DecodeError(
                "timeout", "decode", f"{stream.video.uri}: decoding took longer than {self.timeout_s:g} s; "
                "worker killed"))  # fmt: skip
        try:
            return stream.worker.conn.recv()
        except (EOFError, OSError) as exc:
            code = stream.worker.exit_code()
            if stream.tries <= CRASH_RETRIES:
                log.warning("%s: decode worker died (exit code %s); retrying", stream.video.uri, code)
                stream.worker.kill()
                stream.worker = self._spawn()
                stream.tries += 1
                stream.skip = stream.consumed
                stream.worker.conn.send(stream.video)
                return None
            return self._replace(stream, DecodeError(
                "decoder_crash", "decode", f"{stream.video.uri}: decode worker died (exit code {code}, "
                f"{type(exc).__name__}) on {stream.tries} tries"))  # fmt: skip

    def _replace(self, stream: _Stream, error: DecodeError) -> VideoFailure:
        """Kill the stream's worker, put a fresh one in its place, fail the video with ``error``."""
        stream.worker.kill()
        stream.worker = self._spawn()
        return VideoFailure(stream.video.video_id, error, size_bytes=stream.video.size_bytes)

    def close(self) -> None:
        for worker in self.idle:  # all asked first: they exit together, not one after another
            worker.stop()
        for worker in self.idle:
            worker.close()
        self.idle = []


class LocalExecutor:
    """Run every shard of the queue in this process, one after another, with one model copy."""

    name = "local"

    def run(self, context: Any, queue: Any, bar: Any) -> None:
        from videoindex.stages.model import ModelThread, VideoClassifier, cuda_available

        split = local_split(
            context.config, cpus=os.cpu_count() or 1, cuda=cuda_available(context.config.model)
        )
        log.info("local execution: %s", split)
        pool = LocalDecodePool(context.settings, workers=min(split.decode_slots, max(context.videos, 1)),
                               timeout_s=context.config.decode.timeout_s, idle_priority=split.decode_idle_priority)  # fmt: skip
        model = ModelThread(lambda: VideoClassifier(context.model, context.config.model), split.torch_threads)
        where = {"node": socket.gethostname(), "actor": "local", "pid": os.getpid()}
        indexer = ShardIndexer(context, model, pool, batch_size=split.batch_size, where=where)
        try:
            while (work := queue.pop()) is not None:
                try:
                    queue.done(work, indexer.index(work))
                except Exception as exc:  # the shard's files or commit failed: infrastructure, retried
                    log.debug("shard %d failed", work.shard, exc_info=True)
                    queue.fail(work, f"shard failed: {type(exc).__name__}: {exc}")
                finally:
                    trim_heap()  # the shard's clips and tables are gone: stay flat over thousands of shards
                bar.tick(indexer.counters.snapshot)
        finally:
            pool.close()
            model.close()
