"""Shard lifecycle on storage: an append-only log of attempt events, checkpoints of it, and run heartbeats.

A shard is pending -> running (attempt, actor, node, heartbeat) -> committed | failed. Under OUTPUT::

    _ledger/log/{key}.s{shard}.a{attempt}.{event}.json   started | committed | failed (| uncommitted)
    _ledger/checkpoints/{position}.parquet               every shard's settled state, written now and then
    _ledger/runs/{run}.json                              a run of the job: its driver's heartbeat

``key`` = ``{run}-{seq}``: ``run`` is when the run started (ms, above every earlier run), ``seq`` the order
the driver handed out attempts, so an attempt's events sort together and after everything the attempts
before it wrote. The commit event (holding the shard's stats) is written after all of the shard's table
files and names their version, so a reader that trusts only committed shards never sees a half-written
one, and a rewrite (new files beside the committed ones) is seen whole or not at all; log events are the
source of truth. ``uncommitted`` events come from outputs of versions that rewrote files in place: they
withdrew the commit until a later attempt committed, and are still read that way. A checkpoint holds each
shard's state after its finished attempts (and the numbers of its stats as columns), and its ``position``
is the key of the first attempt still unfinished when it was written: a reader takes the latest
checkpoint and lists only the log entries after its position (S3: one request per 1,000 names), so
status, query and resume cost a bounded number of requests however many shards the job has. A missing or
damaged checkpoint falls back to a listing of the whole log, with a warning.

A running attempt renews its ``started`` event every heartbeat interval (one small write, no listing);
readers call it stalled when its heartbeat is older than ``STALLED_AFTER`` intervals.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from videoindex import storage
from videoindex.format.layout import LEDGER_DIR

log = logging.getLogger(__name__)

TOTAL_KEYS = ("videos", "videos_ok", "videos_error", "clips")
# The numbers of a commit's stats that readers add up or compare; a checkpoint holds them as columns, so
# status, resume and the job's summary never parse the stats' JSON (100,000 shards: seconds of parsing).
COUNT_KEYS = (*TOTAL_KEYS, "duration_s_ok", "started_at", "finished_at", "generation", "version", "attempt")
EVENTS = ("started", "uncommitted", "committed", "failed")
LOG, CHECKPOINTS, RUNS = "log", "checkpoints", "runs"
STALLED_AFTER = 3  # heartbeat intervals without a renewal before an attempt counts as stalled
KEEP_CHECKPOINTS = 2
V1_KEY = "0" * 13 + "-" + "0" * 7  # events of outputs written before the log (videoindex < 0.2) sort first
_NAME = re.compile(r"^(\d{13}-\d{7})\.s(\d+)\.a(\d+)\.(started|uncommitted|committed|failed)\.json$")
_V1 = re.compile(r"^(committed|failed|attempts)/shard-(\d+)(?:\.a(\d+)\.(started|failed))?\.json$")


def attempt_key(run: int, seq: int) -> str:
    return f"{run:013d}-{seq:07d}"


def event_name(key: str, shard: int, attempt: int, event: str) -> str:
    return f"{key}.s{shard:05d}.a{attempt:02d}.{event}.json"


@dataclass
class ShardState:
    """What the ledger says of one shard: its settled state, and the attempt running now (if any)."""

    shard: int
    committed: bool = False
    final_failure: bool = False
    attempts: int = 0
    failed_attempts: int = 0
    last_failure: str | None = None
    applied_key: str = ""  # the key of the last finished attempt folded in
    running: dict[str, Any] | None = None  # the unfinished attempt's started record (+ "key", "uncommitted")
    _stats: dict[str, Any] | None = field(default=None, repr=False)
    _stats_json: str | None = field(default=None, repr=False)  # from a checkpoint: parsed when asked for
    _counts: dict[str, float] | None = field(default=None, repr=False)
    _labels: int | None = field(default=None, repr=False)  # from a checkpoint: see ``clip_labels_mask``

    @property
    def stats(self) -> dict[str, Any] | None:
        """The committed attempt's stats."""
        if self._stats is None and self._stats_json is not None:
            self._stats, self._stats_json = json.loads(self._stats_json), None
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, Any] | None) -> None:
        self._stats, self._stats_json, self._counts, self._labels = value, None, None, None

    @property
    def counts(self) -> dict[str, float]:
        """The committed stats' COUNT_KEYS (those present), without parsing the rest."""
        if self._counts is None:
            stats = self.stats or {}
            self._counts = {key: stats[key] for key in COUNT_KEYS if stats.get(key) is not None}
        return self._counts

    @property
    def clip_labels_mask(self) -> int | None:
        """The clip labels the committed shard holds, as a bit mask (bit i: label id i); None when its
        stats have no label histogram (written by videoindex < 0.2). A checkpoint keeps it as a column,
        so the labels an index has seen are an OR over shards instead of parsing every stats JSON."""
        if self._labels is None:
            labels = (self.stats or {}).get("clip_labels")
            self._labels = None if labels is None else sum(1 << int(k) for k in set(labels))
        return self._labels

    @property
    def version(self) -> int:
        """The version of the committed files (``format.layout.table_file``); 0 before any rewrite."""
        return int(self.counts.get("version", 0))

    @property
    def commit(self) -> tuple[int, int]:
        """(version of the committed files, attempt that committed them): one set of rows. The version
        alone is not: a shard not committed when queued is written again as version 0."""
        return self.version, int(self.counts.get("attempt", 0))

    @property
    def generation(self) -> int:
        """The plan generation the committed files are from (``job.update``)."""
        return int(self.counts.get("generation", 0))

    @property
    def status(self) -> str:
        """committed | running | failed | pending (a rewrite of a committed shard leaves it committed: its
        new files are another version until their commit; ``uncommitted`` events, written by versions that
        rewrote files in place, withdrew the commit for the rewrite)."""
        if self.committed and not (self.running and self.running.get("uncommitted")):
            return "committed"
        if self.running is not None:
            return "running"
        return "failed" if self.final_failure else "pending"

    def heartbeat_age(self, now: float) -> float | None:
        if self.running is None:
            return None
        return now - float(self.running.get("heartbeat_at") or self.running.get("started_at") or now)


@dataclass
class _Attempt:
    key: str
    shard: int
    attempt: int
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # event -> record


@dataclass
class LedgerView:
    """The ledger as of one read: a checkpoint and the log entries after its position."""

    shards: dict[int, ShardState] = field(default_factory=dict)
    position: str = ""  # log entries after this key were read
    last_key: str = ""  # the highest key seen

    def state(self, shard: int) -> ShardState:
        return self.shards.setdefault(shard, ShardState(shard))

    def committed(self) -> set[int]:
        return {s for s, st in self.shards.items() if st.status == "committed"}

    def committed_versions(self) -> dict[int, int]:
        """{shard: version of its committed files}, in shard order: what readers open."""
        return {s: st.version for s, st in sorted(self.shards.items()) if st.status == "committed"}

    def committed_commits(self) -> dict[int, tuple[int, int]]:
        """{shard: ShardState.commit}, in shard order: what compacted copies are checked against."""
        return {s: st.commit for s, st in sorted(self.shards.items()) if st.status == "committed"}

    def failed(self) -> set[int]:
        return {s for s, st in self.shards.items() if st.status == "failed"}

    def running(self) -> dict[int, ShardState]:
        return {s: st for s, st in self.shards.items() if st.running is not None}

    def committed_stats(self) -> list[dict[str, Any]]:
        return [st.stats for st in self.shards.values() if st.status == "committed" and st.stats is not None]

    def labels_seen(self) -> int | None:
        """How many distinct clip labels the committed shards hold; None if a shard's stats cannot say."""
        seen = 0
        for st in self.shards.values():
            if st.status == "committed":
                mask = st.clip_labels_mask
                if mask is None:
                    return None
                seen |= mask
        return seen.bit_count()

    def committed_counts(self) -> list[dict[str, float]]:
        """Each committed shard's COUNT_KEYS: what totals and rates need, cheap at any shard count."""
        return [st.counts for st in self.shards.values() if st.status == "committed" and st.counts]

    def apply(self, attempt: _Attempt) -> None:
        """Fold one attempt's events in (attempts in key order; those a checkpoint holds are skipped)."""
        state = self.state(attempt.shard)
        self.last_key = max(self.last_key, attempt.key)
        if attempt.key <= state.applied_key:
            return
        state.attempts = max(state.attempts, attempt.attempt)
        events = attempt.events
        if "committed" not in events and "failed" not in events:  # unfinished: not settled
            if "uncommitted" in events:  # its files may be half rewritten: never committed again until
                state.committed = False  # a later attempt commits (also when that one writes no withdrawal)
            if "started" in events or "uncommitted" in events:
                record = dict(events.get("started") or {})
                state.running = {**record, "key": attempt.key, "attempt": attempt.attempt,
                                 "uncommitted": "uncommitted" in events}  # fmt: skip
            return
        state.applied_key, state.running = attempt.key, None
        if "uncommitted" in events:
            state.committed = False
        if "committed" in events:
            state.committed, state.stats, state.final_failure = True, events["committed"], False
        if "failed" in events:
            failure = events["failed"]
            state.failed_attempts += 1
            state.last_failure = failure.get("reason")
            state.final_failure = bool(failure.get("final")) and not state.committed

    def checkpoint_position(self) -> str:
        """The first unfinished attempt's key, or just past the last key when none is unfinished."""
        unfinished = [st.running["key"] for st in self.shards.values() if st.running is not None]
        if unfinished:
            return min(unfinished)
        return self.last_key + "~" if self.last_key else ""  # "~" sorts after the key's own events


# A checkpoint's columns: these, then COUNT_KEYS, then clip_labels_mask (ShardState.clip_labels_mask).
STATE_COLUMNS = ("shard", "committed", "final_failure", "attempts", "failed_attempts", "last_failure", "stats",
                 "applied_key")  # fmt: skip


def _checkpoint_bytes(view: LedgerView) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    states = sorted(view.shards.values(), key=lambda s: s.shard)
    table = pa.table({
        "shard": pa.array([s.shard for s in states], pa.int32()),
        "committed": [s.committed for s in states],
        "final_failure": [s.final_failure for s in states],
        "attempts": pa.array([s.attempts for s in states], pa.int32()),
        "failed_attempts": pa.array([s.failed_attempts for s in states], pa.int32()),
        "last_failure": pa.array([s.last_failure for s in states], pa.string()),
        "stats": pa.array([_stats_text(s) for s in states], pa.string()),
        "applied_key": [s.applied_key for s in states],
        **{key: pa.array([s.counts.get(key) for s in states], pa.float64()) for key in COUNT_KEYS},
        "clip_labels_mask": pa.array([_mask_bytes(s) for s in states], pa.binary()),
    })  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _mask_bytes(state: ShardState) -> bytes | None:
    mask = state.clip_labels_mask if state._labels is not None or state.stats is not None else None
    return None if mask is None else mask.to_bytes(max(1, (mask.bit_length() + 7) // 8), "little")


def _stats_text(state: ShardState) -> str | None:
    if state._stats_json is not None:  # from the previous checkpoint, never parsed: written back as it was
        return state._stats_json
    return json.dumps(state.stats, sort_keys=True) if state.stats else None


def _view_from_checkpoint(data: bytes, position: str) -> LedgerView:
    """The states a checkpoint holds, column by column; stats stay JSON text until someone reads them
    (their numbers come from the count columns, in checkpoints that have them)."""
    import pyarrow.parquet as pq

    # One thread: no Arrow pool work may still run when a command exits right after reading the ledger
    # (an Arrow thread torn down mid-task aborts the interpreter: apache/arrow#39862).
    table = pq.read_table(io.BytesIO(data), use_threads=False)
    columns = {name: table[name].to_pylist() for name in STATE_COLUMNS}
    # A checkpoint without every count column (written before them): counts come from the stats.
    complete = all(key in table.column_names for key in COUNT_KEYS)
    count_rows = zip(*(table[key].to_pylist() for key in COUNT_KEYS), strict=True) if complete else None
    masks = table["clip_labels_mask"].to_pylist() if "clip_labels_mask" in table.column_names else None
    view = LedgerView(position=position, last_key=position.rstrip("~"))
    for n, shard in enumerate(columns["shard"]):
        state = ShardState(int(shard), bool(columns["committed"][n]), bool(columns["final_failure"][n]),
                           int(columns["attempts"][n]), int(columns["failed_attempts"][n]),
                           columns["last_failure"][n], columns["applied_key"][n])  # fmt: skip
        state._stats_json = columns["stats"][n]
        if count_rows is not None:
            values = next(count_rows)
            if state._stats_json is not None:
                state._counts = {k: v for k, v in zip(COUNT_KEYS, values, strict=True) if v is not None}
        if masks is not None and masks[n] is not None and state._stats_json is not None:
            state._labels = int.from_bytes(masks[n], "little")
        view.shards[state.shard] = state
    return view


class Ledger:
    """Reads and writes the ledger of one OUTPUT."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root

    def _path(self, *parts: str) -> str:
        return storage.join(self.root, LEDGER_DIR, *parts)

    # ------------------------------------------------------------------------------------- reading

    def view(self) -> LedgerView:
        """The latest checkpoint plus the log entries after its position (a full read without one)."""
        view = self._latest_checkpoint()
        names = storage.list_after(self.fs, self._path(LOG), view.position)
        attempts = self._attempts(self._parse(names, self._path(LOG)))
        if not view.position:
            attempts = self._v1_attempts() + attempts
        for attempt in attempts:
            view.apply(attempt)
        return view

    def _latest_checkpoint(self) -> LedgerView:
        names = [n for n in storage.list_after(self.fs, self._path(CHECKPOINTS)) if n.endswith(".parquet")]
        if not names:
            return LedgerView()
        latest = names[-1]
        try:
            data = storage.with_retries(lambda: self.fs.cat_file(self._path(CHECKPOINTS, latest)),
                                        what=f"read checkpoint {latest}")  # fmt: skip
            return _view_from_checkpoint(data, latest.removesuffix(".parquet"))
        except Exception as exc:  # damaged or vanished: the log is the source of truth
            log.warning("ledger checkpoint %s unreadable (%s: %s); reading the whole log instead",
                        latest, type(exc).__name__, exc)  # fmt: skip
            return LedgerView()

    def _parse(self, names: Iterable[str], folder: str) -> list[tuple[str, int, int, str, str]]:
        found = []
        for name in names:
            match = _NAME.match(name)
            if match:
                key, shard, attempt, event = match.groups()
                found.append((key, int(shard), int(attempt), event, storage.join(folder, name)))
        return found

    def _attempts(self, entries: list[tuple[str, int, int, str, str]]) -> list[_Attempt]:
        """Group events by attempt and read the records a reader needs: stats, failures, and the started
        record of attempts that have not finished."""
        grouped: dict[tuple[str, int, int], _Attempt] = {}
        for key, shard, attempt, event, path in entries:
            grouped.setdefault((key, shard, attempt), _Attempt(key, shard, attempt)).events[event] = {
                "_path": path
            }
        for attempt in grouped.values():
            finished = "committed" in attempt.events or "failed" in attempt.events
            for event, record in attempt.events.items():
                if event in ("committed", "failed") or (event == "started" and not finished):
                    attempt.events[event] = self._read(record["_path"])
        return sorted(grouped.values(), key=lambda a: (a.key, a.shard))

    def _read(self, path: str) -> dict[str, Any]:
        try:
            return storage.read_json(self.fs, path)
        except FileNotFoundError:  # replaced between the listing and the read (a heartbeat): list again
            return {}

    def _v1_attempts(self) -> list[_Attempt]:
        """Events of an output written before the log (committed/, failed/, attempts/ markers)."""
        found: dict[int, _Attempt] = {}
        for name in storage.list_names(self.fs, self._path()):
            match = _V1.match(name)
            if not match:
                continue
            kind, shard, attempt, event = match.group(1), int(match.group(2)), match.group(3), match.group(4)
            entry = found.setdefault(shard, _Attempt(V1_KEY, shard, 0))
            entry.attempt = max(entry.attempt, int(attempt or 0))
            if kind == "committed":
                entry.events["committed"] = self._read(self._path(name))
            elif kind == "failed":
                entry.events.setdefault("failed", {**self._read(self._path(name)), "final": True})
            elif event == "started":
                entry.events.setdefault("started", {})
        return list(found.values())

    def runs(self) -> list[dict[str, Any]]:
        """Every run's record, oldest first (one listing, one read per run)."""
        names = [n for n in storage.list_after(self.fs, self._path(RUNS)) if n.endswith(".json")]
        return [self._read(self._path(RUNS, n)) for n in names]

    def latest_run(self) -> dict[str, Any] | None:
        names = [n for n in storage.list_after(self.fs, self._path(RUNS)) if n.endswith(".json")]
        return self._read(self._path(RUNS, names[-1])) if names else None

    def committed_record(self, key: str, shard: int, attempt: int) -> dict[str, Any] | None:
        """The commit event of one attempt (its stats), or None if it did not commit."""
        try:
            return storage.read_json(self.fs, self._path(LOG, event_name(key, shard, attempt, "committed")))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------------------------- writing

    def event(self, key: str, shard: int, attempt: int, event: str, record: dict[str, Any]) -> None:
        if event not in EVENTS:
            raise ValueError(f"ledger event {event!r} is not one of {EVENTS}")
        body = {"shard": shard, "attempt": attempt, "event": event, "time": time.time(), **record}
        storage.write_json(self.fs, self._path(LOG, event_name(key, shard, attempt, event)), body)

    def write_checkpoint(self, view: LedgerView) -> str:
        """Write ``view``'s settled states as the latest checkpoint; keep the last KEEP_CHECKPOINTS."""
        position = view.checkpoint_position()
        storage.write_bytes(self.fs, self._path(CHECKPOINTS, f"{position}.parquet"), _checkpoint_bytes(view))
        old = [n for n in storage.list_after(self.fs, self._path(CHECKPOINTS)) if n.endswith(".parquet")]
        for name in old[:-KEEP_CHECKPOINTS]:
            storage.with_retries(lambda name=name: self.fs.rm_file(self._path(CHECKPOINTS, name)),
                                 what=f"delete checkpoint {name}")  # fmt: skip
        return position

    def write_run(self, run: int, record: dict[str, Any]) -> None:
        storage.write_json(self.fs, self._path(RUNS, f"{run:013d}.json"), {"run": run, **record})


class Heartbeat:
    """Rewrites a record every ``interval_s`` in a thread (a lease): ``record()`` gives its content, with
    ``heartbeat_at`` set at each write. One small write per interval, never a listing."""

    def __init__(self, write: Any, record: Any, interval_s: float) -> None:
        self.write, self.record, self.interval_s = write, record, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="videoindex-heartbeat")

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        self.write({**self.record(), "heartbeat_at": time.time()})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as exc:  # a missed beat only makes the attempt look stalled for a while
                log.warning("heartbeat write failed (%s: %s)", type(exc).__name__, exc)


def committed_totals(stats: list[dict[str, Any]]) -> tuple[dict[str, int], float]:
    """Video/clip totals over committed shards' stats, and the wall seconds those shards spanned."""
    totals = {k: sum(int(s.get(k, 0)) for s in stats) for k in TOTAL_KEYS}
    spans = [(s["started_at"], s["finished_at"]) for s in stats if "started_at" in s]
    busy = max(e for _, e in spans) - min(b for b, _ in spans) if spans else 0.0
    return totals, busy
