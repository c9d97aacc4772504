"""Index one shard: decoded clip batches -> batched model calls -> the shard's tables -> committed files.

The unit of work of every executor. Plain Python: ``index_shard`` takes the shard's videos, a
``DecodeStreams`` (decode in this process, in local worker processes, or as Ray streaming tasks) and a
classifier; ``ShardIndexer`` adds the ledger, the files and the commit. Events are consumed video by
video in plan order and batches are formed in that order, so a shard gives bit-identical outputs
whatever the timing and whichever executor ran it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from videoindex import __version__, storage
from videoindex.format.layout import shard_name
from videoindex.format.ledger import Heartbeat, Ledger
from videoindex.format.plans import VideoTask
from videoindex.format.tables import (
    file_metadata,
    read_shard_tables,
    remove_superseded,
    replace_videos,
    stats_from_tables,
    write_shard_tables,
)
from videoindex.stages.decode import ClipBatch, VideoEnd, VideoEvent, VideoFailure, VideoPlan
from videoindex.stages.tabulate import ClipRow, VideoRecord, shard_tables

log = logging.getLogger(__name__)

DecodeStreams = Callable[[Sequence[VideoTask]], Iterator[VideoEvent]]


@dataclass(frozen=True)
class ShardWork:
    """One attempt at one shard: its videos (from the driver's plan), or only ``video_ids`` of them."""

    shard: int
    attempt: int
    videos: tuple[VideoTask, ...]
    video_ids: tuple[str, ...] | None = None  # re-index only these videos of a committed shard
    key: str = ""  # the attempt's place in the ledger's log (format.ledger.attempt_key)
    committed_version: int | None = None  # the version of the shard's committed files; None: not committed
    generation: int = 0  # the plan generation this attempt brings the shard up to (job.update)

    @property
    def replaces(self) -> bool:
        """The shard is committed: write a new version of its files, then drop the old."""
        return self.committed_version is not None


@dataclass(frozen=True)
class ShardOutput:
    """The shard's tables and its stats (stats are not part of the tables: they vary run to run)."""

    tables: dict[str, Any]
    stats: dict[str, Any]


class _Batcher:
    """Collects clips across videos in arrival order and runs the model on full batches."""

    def __init__(self, classifier: Callable[[np.ndarray], Any], batch_size: int) -> None:
        self.classifier, self.batch_size = classifier, batch_size
        self.frames: list[np.ndarray] = []
        self.rows: list[ClipRow] = []
        self.infer_s = 0.0

    def add(self, rows: list[ClipRow], frames: np.ndarray) -> None:
        for row, clip in zip(rows, frames, strict=True):
            self.frames.append(clip)
            self.rows.append(row)
            if len(self.frames) == self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self.frames:
            return
        started = time.perf_counter()
        out = self.classifier(np.stack(self.frames))
        self.infer_s += time.perf_counter() - started
        for n, row in enumerate(self.rows):
            row.logits, row.embedding, row.probs = out.logits[n], out.embeddings[n], out.probs[n]
            row.topk_ids, row.topk_scores = out.topk_ids[n], out.topk_scores[n]
        self.frames, self.rows = [], []


def _clip_rows(batch: ClipBatch) -> list[ClipRow]:
    return [
        ClipRow(spec, *batch.times_s[n], thumbnail=batch.thumbnails[n]) for n, spec in enumerate(batch.clips)
    ]


class Counters:
    """Progress of one worker (videos finished, clips decoded, videos failed), read by the driver's bar."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"videos": 0, "clips": 0, "errors": 0}

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, delta in deltas.items():
                self.values[key] += delta

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


class _Tally:
    """Per-shard decode figures for the commit marker."""

    def __init__(self) -> None:
        self.decode_s = 0.0
        self.videos = self.cold_starts = 0


def index_shard(videos: Sequence[VideoTask], decode: DecodeStreams, classifier: Any, *, batch_size: int,
                counters: Counters | None = None) -> ShardOutput:  # fmt: skip
    """Decode, classify and tabulate every video of a shard. Bad videos become error rows."""
    counters = counters or Counters()
    started = time.perf_counter()
    records = {v.video_id: VideoRecord(v, size_bytes=v.size_bytes) for v in videos}
    batcher, tally = _Batcher(classifier, batch_size), _Tally()
    for event in decode(list(videos)):
        record = records[event.video_id]
        if isinstance(event, VideoPlan):
            record.meta, record.size_bytes = event.meta, event.size_bytes
        elif isinstance(event, ClipBatch):
            rows = _clip_rows(event)
            record.clips.extend(rows)
            batcher.add(rows, event.frames)
            tally.decode_s += event.decode_s
            counters.add(clips=len(rows))
        else:
            _finish(record, event, tally)
            counters.add(videos=1, errors=int(isinstance(event, VideoFailure)))
    batcher.flush()
    tables = shard_tables(records.values(), classifier.info)
    stats = {  # counts of videos and clips come from the tables that get written (ShardIndexer)
        "decode_s": round(tally.decode_s, 3),
        "infer_s": round(batcher.infer_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "bytes_in": int(sum(r.size_bytes or 0 for r in records.values())),
        "decode_tasks": tally.videos,
        "decode_cold_starts": tally.cold_starts,
    }
    return ShardOutput(tables=tables, stats=stats)


def _finish(record: VideoRecord, event: VideoEnd | VideoFailure, tally: _Tally) -> None:
    tally.videos += 1
    tally.cold_starts += int(event.cold_start)
    record.recovered.extend(event.recovered)
    if event.meta is not None:
        record.meta = event.meta  # the decoder that produced the clips (after a fallback)
    if isinstance(event, VideoFailure):
        record.error = event.error
        record.size_bytes = event.size_bytes if event.size_bytes is not None else record.size_bytes
        record.clips.clear()  # clips decoded before the failure are dropped with the video


class ShardIndexer:
    """One model copy that indexes whole shards and commits them (the same object in every executor)."""

    def __init__(self, context: Any, classifier: Any, decode: DecodeStreams, *, batch_size: int,
                 where: dict[str, Any]) -> None:  # fmt: skip
        self.context, self.classifier, self.decode, self.where = context, classifier, decode, where
        self.batch_size = batch_size
        self.heartbeat_s = context.config.execution.heartbeat_s
        self.fs, self.root = storage.filesystem(context.output_uri, context.config.output.storage_options)
        self.ledger = Ledger(self.fs, self.root)
        self.metadata = file_metadata(context.model, __version__)
        self.counters = Counters()

    def index(self, work: ShardWork) -> dict[str, Any]:
        """Index a shard (or only ``work.video_ids`` of a committed shard), write it, commit it; the attempt's
        started event is renewed every ``execution.heartbeat_s`` while it runs."""
        started = time.time()
        record = {
            **self.where,
            "started_at": started,
            "videos_retried": len(work.video_ids) if work.video_ids else None,
        }

        def write(content: dict[str, Any]) -> None:
            self.ledger.event(work.key, work.shard, work.attempt, "started", content)

        with Heartbeat(write, lambda: record, self.heartbeat_s):
            stats = self._index(work, started)
        log.info("[shard %s] committed: %s", shard_name(work.shard), stats)
        return stats

    def _index(self, work: ShardWork, started: float) -> dict[str, Any]:
        videos = work.videos
        if work.video_ids is not None:  # ids of videos gone from the input are dropped, not indexed
            previous = read_shard_tables(self.fs, self.root, work.shard, work.committed_version or 0)
            wanted = set(work.video_ids)
            videos = tuple(v for v in videos if v.video_id in wanted)
        log.info("[shard %s] attempt %d: %d videos", shard_name(work.shard), work.attempt, len(videos))
        out = index_shard(
            videos, self.decode, self.classifier, batch_size=self.batch_size, counters=self.counters
        )
        tables = (
            out.tables if work.video_ids is None else replace_videos(previous, out.tables, work.video_ids)
        )
        # A committed shard's new files are another version: readers keep the old rows until the commit.
        version = work.attempt if work.replaces else 0
        written = write_shard_tables(self.fs, self.root, work.shard, tables, metadata=self.metadata, version=version,
                                     clips_row_group_size=self.context.config.output.clips_row_group_size)  # fmt: skip
        stats = {**out.stats, **stats_from_tables(tables), "shard": work.shard, "attempt": work.attempt,
                 "version": version, "generation": work.generation, "started_at": started,
                 "finished_at": time.time(), "bytes_written": written, **self.where}  # fmt: skip
        self.ledger.event(work.key, work.shard, work.attempt, "committed", stats)
        if work.replaces:
            self._remove_superseded(work.shard, version)
        return stats

    def _remove_superseded(self, shard: int, version: int) -> None:
        """Delete the files the commit superseded; a failure leaves them for the shard's next rewrite
        (readers follow the commit, so they never read them)."""
        try:
            removed = remove_superseded(self.fs, self.root, shard, version)
            log.info("[shard %s] removed %d superseded files", shard_name(shard), len(removed))
        except Exception as exc:
            log.warning("[shard %s] superseded files not removed (%s: %s); the next rewrite removes them",
                        shard_name(shard), type(exc).__name__, exc)  # fmt: skip
