"""The live progress bar of a job on the driver: videos, clips, clips/s, errors, shards, ETA.

Counts come from the executor's workers (decoded videos and clips) and the queue's commits; the bar is
refreshed at most once a second, so polling never slows the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Counts = Callable[[], dict[str, int]]  # videos, clips, errors so far


class JobProgress:
    """Context manager; ``tick(counts)`` is called by the executor's loop."""

    def __init__(self, videos: int, shards: int, queue: Any, *, enabled: bool = True) -> None:
        self.enabled, self.videos, self.shards, self.queue = enabled, videos, shards, queue
        self.started = time.time()
        self.last = 0.0
        self.progress = Progress(
            TextColumn("[bold]indexing[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} videos"),
            TextColumn("{task.fields[clips]} clips"),
            TextColumn("{task.fields[rate]} clips/s"),
            TextColumn("[red]{task.fields[errors]} errors[/]"),
            TextColumn("shards {task.fields[shards]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task: Any = None

    def __enter__(self) -> JobProgress:
        self.progress.start()
        self.task = self.progress.add_task(
            "index", total=self.videos, clips=0, rate="-", errors=0, shards=f"0/{self.shards}"
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def tick(self, counts: Counts) -> None:
        now = time.time()
        if not self.enabled or now - self.last < 1.0:
            return
        self.last = now
        got = counts()
        rate = got["clips"] / max(now - self.started, 1e-6)
        self.progress.update(self.task, completed=got["videos"], clips=got["clips"], rate=f"{rate:.1f}",
                             errors=got["errors"], shards=f"{len(self.queue.committed)}/{self.shards}")  # fmt: skip
