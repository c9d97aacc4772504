"""Shard lifecycle on storage: attempts, commit markers, final failures.

A shard is pending -> running (attempt, actor, node) -> committed | failed. The commit marker
``_ledger/committed/shard-NNNNN.json`` (holding the shard's stats) is written after all of the shard's
table files, so a reader that trusts only committed shards never sees a half-written one. Everything
here is found with one listing of ``_ledger/``: no per-video probing of storage.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from videoindex import storage
from videoindex.format.layout import LEDGER_DIR, shard_name

log = logging.getLogger(__name__)

TOTAL_KEYS = ("videos", "videos_ok", "videos_error", "clips")
_ENTRY = re.compile(r"^(committed|failed|attempts)/shard-(\d+)(?:\.a(\d+)\.(started|failed))?\.json$")


@dataclass
class ShardState:
    """What the ledger says of one shard."""

    shard: int
    status: str = "pending"  # pending | running | committed | failed
    attempts: int = 0
    failed_attempts: int = 0


@dataclass
class LedgerView:
    """One listing of the ledger, parsed."""

    shards: dict[int, ShardState] = field(default_factory=dict)

    def state(self, shard: int) -> ShardState:
        return self.shards.setdefault(shard, ShardState(shard))

    def committed(self) -> set[int]:
        return {s for s, st in self.shards.items() if st.status == "committed"}

    def failed(self) -> set[int]:
        return {s for s, st in self.shards.items() if st.status == "failed"}


class Ledger:
    """Reads and writes the shard ledger of one OUTPUT."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root

    def _path(self, *parts: str) -> str:
        return storage.join(self.root, LEDGER_DIR, *parts)

    def view(self) -> LedgerView:
        """Parse one recursive listing of _ledger/ into per-shard states."""
        view = LedgerView()
        for name in storage.list_names(self.fs, self._path()):
            match = _ENTRY.match(name)
            if not match:
                continue
            kind, shard, attempt, event = match.group(1), int(match.group(2)), match.group(3), match.group(4)
            state = view.state(shard)
            if kind == "committed":
                state.status = "committed"
            elif kind == "failed" and state.status != "committed":
                state.status = "failed"
            elif kind == "attempts":
                state.attempts = max(state.attempts, int(attempt))
                if event == "failed":
                    state.failed_attempts += 1
        for state in view.shards.values():
            if state.status == "pending" and state.attempts > state.failed_attempts:
                state.status = "running"
        return view

    def started(self, shard: int, attempt: int, info: dict[str, Any]) -> None:
        record = {"shard": shard, "attempt": attempt, "event": "started", "time": time.time(), **info}
        storage.write_json(
            self.fs, self._path("attempts", f"shard-{shard_name(shard)}.a{attempt:02d}.started.json"), record
        )

    def attempt_failed(self, shard: int, attempt: int, reason: str, final: bool) -> None:
        record = {
            "shard": shard,
            "attempt": attempt,
            "event": "failed",
            "time": time.time(),
            "reason": reason,
        }
        storage.write_json(
            self.fs, self._path("attempts", f"shard-{shard_name(shard)}.a{attempt:02d}.failed.json"), record
        )
        if final:
            storage.write_json(self.fs, self._path("failed", f"shard-{shard_name(shard)}.json"), record)

    def commit(self, shard: int, stats: dict[str, Any]) -> None:
        """Write the commit marker: call only after every table file of the shard is written."""
        storage.write_json(self.fs, self._path("committed", f"shard-{shard_name(shard)}.json"), stats)
        failed = self._path("failed", f"shard-{shard_name(shard)}.json")
        if storage.exists(self.fs, failed):
            self.fs.rm_file(failed)

    def uncommit(self, shard: int) -> None:
        """Withdraw a commit before rewriting a shard's files (video-level retry)."""
        path = self._path("committed", f"shard-{shard_name(shard)}.json")
        if storage.exists(self.fs, path):
            self.fs.rm_file(path)

    def committed_stats(self) -> list[dict[str, Any]]:
        """The stats of every committed shard (reads one small JSON per committed shard)."""
        names = storage.list_names(self.fs, self._path("committed"))
        return [storage.read_json(self.fs, self._path("committed", n)) for n in names if n.endswith(".json")]

    def committed_stats_of(self, shard: int) -> dict[str, Any]:
        """One committed shard's stats (its commit marker)."""
        return storage.read_json(self.fs, self._path("committed", f"shard-{shard_name(shard)}.json"))

    def attempt_records(self) -> list[dict[str, Any]]:
        names = storage.list_names(self.fs, self._path("attempts"))
        return [storage.read_json(self.fs, self._path("attempts", n)) for n in names if n.endswith(".json")]


def committed_totals(stats: list[dict[str, Any]]) -> tuple[dict[str, int], float]:
    """Video/clip totals over committed shards' stats, and the wall seconds those shards spanned."""
    totals = {k: sum(int(s.get(k, 0)) for s in stats) for k in TOTAL_KEYS}
    spans = [(s["started_at"], s["finished_at"]) for s in stats if "started_at" in s]
    busy = max(e for _, e in spans) - min(b for b, _ in spans) if spans else 0.0
    return totals, busy
