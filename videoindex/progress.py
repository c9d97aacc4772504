"""The live progress bar of a job on the driver: videos, clips, clips/s, errors, ETA.

Counts come from the actors' counters (decoded videos and clips) and the ledger's commit count; the
bar is refreshed at most once a second so polling never slows the job.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from videoindex.config import JobConfig
from videoindex.ledger import Ledger


class JobProgress:
    """Context manager; ``tick(dispatcher)`` is called by the dispatch loop."""

    def __init__(self, config: JobConfig, ledger: Ledger, shards: int, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.shards = shards
        self.started = time.time()
        self.last = 0.0
        self.videos_total = None
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
        self.task = None
        self.config = config

    def __enter__(self) -> JobProgress:
        self.progress.start()
        self.task = self.progress.add_task(
            "index", total=None, clips=0, rate="-", errors=0, shards=f"0/{self.shards}"
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def tick(self, dispatcher: Any) -> None:
        now = time.time()
        if not self.enabled or now - self.last < 1.0:
            return
        self.last = now
        counts = dispatcher.progress()
        if self.videos_total is None:
            self.videos_total = _planned_videos(dispatcher)
        rate = counts["clips"] / max(now - self.started, 1e-6)
        self.progress.update(
            self.task,
            total=self.videos_total,
            completed=counts["videos"],
            clips=counts["clips"],
            rate=f"{rate:.1f}",
            errors=counts["errors"],
            shards=f"{len(dispatcher.committed)}/{self.shards}",
        )


def _planned_videos(dispatcher: Any) -> int | None:
    from videoindex.jobfile import read_job

    record = read_job(dispatcher.ledger.fs, dispatcher.ledger.root)
    return int(record["plan"]["videos"]) if record else None
