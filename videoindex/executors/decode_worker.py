"""What runs in a decode worker process (a Ray task worker, or a local executor's worker process).

It imports only what decoding needs (no Ray; torch only for the reference resize, ``decode.scale: rgb``
or decord, not for PyAV's swscale). ``decode_task`` is ``stages.decode.decode_video`` as a worker runs
it: at idle CPU priority when asked (beside a CPU model), with ``cold_start`` set on the video's last
event when it was the first video of the process or the first to import torch there (it paid the
start-up). ``warm_up`` pays it ahead. ``serve`` is the local executor's worker loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from videoindex.format.plans import VideoTask
from videoindex.stages.decode import TERMINAL, DecodeSettings, VideoEvent, decode_video

log = logging.getLogger(__name__)

DECODE_PRIORITY_ENV = "VIDEOINDEX_DECODE_PRIORITY"  # "idle": set in the decode workers' environment
_VIDEOS_IN_THIS_PROCESS = 0


def apply_decode_priority() -> None:
    """Put this thread (decoder threads it starts inherit the policy) at idle CPU priority when the
    environment asks for it. Once set it stays: only decode work asking the same runs in this worker."""
    if os.environ.get(DECODE_PRIORITY_ENV) != "idle":
        return
    if not hasattr(os, "SCHED_IDLE"):  # not Linux
        log.warning(
            "%s=idle: this platform has no SCHED_IDLE; decoding runs at normal priority", DECODE_PRIORITY_ENV
        )
        return
    try:
        if os.sched_getscheduler(0) != os.SCHED_IDLE:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: decoding still works, only slower beside the model
        log.warning(
            "%s=idle: cannot set SCHED_IDLE (%s); decoding runs at normal priority", DECODE_PRIORITY_ENV, exc
        )


def needs_torch(settings: DecodeSettings) -> bool:
    """The reference resize (decode.scale rgb, and decord) runs in torch; swscale needs none."""
    return settings.decode.scale == "rgb" or settings.decode.decoder == "decord"


def _one_torch_thread(settings: DecodeSettings) -> None:
    """A decode worker holds one CPU slot: one torch thread (Ray would give it its CPUs, rounded down)."""
    if needs_torch(settings):
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)


def decode_task(video: VideoTask, settings: DecodeSettings) -> Iterator[VideoEvent]:
    """Every event of one video, as a worker process runs it."""
    global _VIDEOS_IN_THIS_PROCESS
    apply_decode_priority()
    # Cold: a new worker, or one warmed without what this decode needs (torch, ~1 s to import).
    cold = _VIDEOS_IN_THIS_PROCESS == 0 or (needs_torch(settings) and "torch" not in sys.modules)
    _one_torch_thread(settings)
    _VIDEOS_IN_THIS_PROCESS += 1
    for event in decode_video(video, settings):
        yield dataclasses.replace(event, cold_start=cold) if isinstance(event, TERMINAL) else event


def warm_up(settings: DecodeSettings | None = None) -> int:
    """Import what a decode needs (PyAV, and torch for the reference resize) so the first videos find a
    ready worker; returns the worker's pid."""
    global _VIDEOS_IN_THIS_PROCESS
    import av  # noqa: F401

    import videoindex.stages.pyav_reader  # noqa: F401

    if settings is not None:
        _one_torch_thread(settings)
    apply_decode_priority()
    _VIDEOS_IN_THIS_PROCESS += 1
    return os.getpid()


def serve(conn: Any) -> None:
    """A local decode worker: receive the settings, then a video at a time, and send its events back one by
    one (a send blocks until the executor reads: backpressure of one chunk), until the executor sends None
    or goes away."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = conn.recv()
    warm_up(settings)
    global _VIDEOS_IN_THIS_PROCESS
    _VIDEOS_IN_THIS_PROCESS = 0
    while True:
        try:
            video = conn.recv()
        except (EOFError, OSError):
            return
        if video is None:
            return
        for event in decode_task(video, settings):
            conn.send(event)


if __name__ == "__main__":  # python -m videoindex.executors.decode_worker FD (the local executor starts it)
    import sys
    from multiprocessing.connection import Connection

    serve(Connection(int(sys.argv[1])))
    # Every event was sent and nothing else is buffered: skip the interpreter's teardown (torch and PyAV
    # make it take about half a second, paid by every job's end).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
