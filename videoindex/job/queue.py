"""The shards a run still has to index: attempts handed out, infrastructure failures retried, all recorded.

Plain Python shared by every executor (datatrove's lesson: one run loop's bookkeeping, not one per
executor). A shard attempt that raises (a write that failed, an actor or node lost) is an infrastructure
failure: it is recorded in the ledger and retried until ``execution.max_attempts`` tries in this run;
bad videos never fail a shard (they are rows). A shard's videos come from the driver's plan (found by
binary search on its shard column), so no worker reads the plan again.
Each attempt gets its key in the ledger's log when it is handed out (``run`` then a sequence number), and
every ``checkpoint_every`` commits the queue writes a ledger checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from typing import Any

import pyarrow as pa

from videoindex.format.layout import shard_name
from videoindex.format.ledger import Ledger, LedgerView, attempt_key
from videoindex.format.plans import ShardRows, live, shard_tasks
from videoindex.job.shard import ShardWork

log = logging.getLogger(__name__)


class ShardQueue:
    """Pending shard attempts, in order; committed stats and final failures of this run."""

    def __init__(self, ledger: Ledger, plan: pa.Table, max_attempts: int, *, run: int, generation: int = 0,
                 checkpoint_every: int = 1000) -> None:  # fmt: skip
        # Deleted inputs are left out once, here: a shard whose videos were all deleted has none to index.
        self.ledger, self.rows, self.max_attempts = ledger, ShardRows(live(plan)), max_attempts
        self.run, self.generation, self.checkpoint_every = run, generation, checkpoint_every
        self.pending: deque[ShardWork] = deque()
        self.committed: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        self.first_attempt: dict[int, int] = {}
        self.handed_out = 0
        self.lock = threading.Lock()

    def add(self, shard: int, attempt: int, video_ids: tuple[str, ...] | None = None, *,
            committed_version: int | None = None) -> None:  # fmt: skip
        """Queue an attempt; ``committed_version`` is the version of the shard's committed files, if any."""
        videos = tuple(shard_tasks(self.rows(shard)))
        work = ShardWork(shard, attempt, videos, video_ids, committed_version=committed_version,
                         generation=self.generation)  # fmt: skip
        self.pending.append(work)

    def __len__(self) -> int:
        return len(self.pending)

    def pop(self) -> ShardWork | None:
        with self.lock:
            if not self.pending:
                return None
            work = self.pending.popleft()
            self.first_attempt.setdefault(work.shard, work.attempt)
            self.handed_out += 1
            return dataclasses.replace(work, key=attempt_key(self.run, self.handed_out))

    def done(self, work: ShardWork, stats: dict[str, Any]) -> None:
        with self.lock:
            self.committed[work.shard] = stats
            self.failed.pop(work.shard, None)
            due = len(self.committed) % self.checkpoint_every == 0
        if due:
            self.checkpoint()

    def fail(self, work: ShardWork, reason: str) -> None:
        """Record a failed attempt; queue the next one unless this run spent ``max_attempts`` on it. An
        attempt that committed before its result was lost (its actor or node died) counts as done: a retry
        would rewrite the shard again, from a version the commit already superseded."""
        stats = self.ledger.committed_record(work.key, work.shard, work.attempt) if work.key else None
        if stats is not None:
            log.warning("[shard %s] attempt %d committed before it was lost (%s): it counts",
                        shard_name(work.shard), work.attempt, reason)  # fmt: skip
            self.done(work, stats)
            return
        with self.lock:
            tries = work.attempt - self.first_attempt.setdefault(work.shard, work.attempt) + 1
            final = tries >= self.max_attempts
            log.warning("[shard %s] attempt %d failed (%s)%s", shard_name(work.shard), work.attempt, reason,
                        "; giving up" if final else "; retrying")  # fmt: skip
            self.ledger.event(
                work.key, work.shard, work.attempt, "failed", {"reason": reason, "final": final}
            )
            if final:
                self.failed[work.shard] = reason
            else:
                self.pending.append(dataclasses.replace(work, attempt=work.attempt + 1, key=""))

    def checkpoint(self) -> LedgerView | None:
        """Write a ledger checkpoint from a fresh read of the ledger (a failure only costs readers time);
        returns the view it wrote, None if it could not."""
        try:
            view = self.ledger.view()
            position = self.ledger.write_checkpoint(view)
            log.info("ledger checkpoint written at %s", position)
            return view
        except Exception as exc:
            log.warning(
                "ledger checkpoint not written (%s: %s); readers list the log instead",
                type(exc).__name__,
                exc,
            )
            return None
