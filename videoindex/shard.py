"""Index one shard: extract results -> batched model calls -> the shard's three tables.

Plain Python: the same function runs in a loop in tests and inside a Ray model actor, where
``run_extracts`` is a Ray-backed window of decode tasks. Results are consumed in request order and
batches are formed in that order, so a shard gives bit-identical outputs whatever the timing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from videoindex.decode import DecodeError
from videoindex.extract import ExtractRequest, ExtractResult, ExtractSettings, extract, follow_up_requests
from videoindex.plan import VideoTask
from videoindex.schema import ERRORS_SCHEMA, STATUS_ERROR, STATUS_OK, VIDEOS_SCHEMA, clips_schema

log = logging.getLogger(__name__)

RunExtracts = Callable[[deque], Iterator[ExtractResult]]


@dataclass
class _VideoState:
    task: VideoTask
    first: ExtractResult | None = None
    error: DecodeError | None = None
    recovered: list[DecodeError] = field(default_factory=list)
    clips: list[dict[str, Any]] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)


@dataclass
class ShardOutput:
    """The shard's tables and its stats (stats are not part of the tables: they vary run to run)."""

    tables: dict[str, pa.Table]
    stats: dict[str, Any]


def run_extracts_inline(settings: ExtractSettings) -> RunExtracts:
    """Decode in this process, one request at a time, in order (tests and debugging)."""

    def run(queue: deque) -> Iterator[ExtractResult]:
        while queue:
            yield extract(queue.popleft(), settings)

    return run


class _Batcher:
    """Collects clips across videos in arrival order and runs the model on full batches."""

    def __init__(self, classifier: Callable[[np.ndarray], Any], batch_size: int) -> None:
        self.classifier = classifier
        self.batch_size = batch_size
        self.frames: list[np.ndarray] = []
        self.owners: list[tuple[_VideoState, dict[str, Any]]] = []
        self.infer_s = 0.0

    def add(self, state: _VideoState, rows: list[dict[str, Any]], frames: np.ndarray) -> None:
        for row, clip in zip(rows, frames, strict=True):
            self.frames.append(clip)
            self.owners.append((state, row))
            if len(self.frames) == self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self.frames:
            return
        started = time.perf_counter()
        out = self.classifier(np.stack(self.frames))
        self.infer_s += time.perf_counter() - started
        for n, (state, row) in enumerate(self.owners):
            row.update(
                logits=out.logits[n],
                embedding=out.embeddings[n],
                topk_ids=out.topk_ids[n],
                topk_scores=out.topk_scores[n],
            )
            state.probs.append(out.probs[n])
        self.frames, self.owners = [], []


def _clip_rows(result: ExtractResult) -> list[dict[str, Any]]:
    rows = []
    for n, spec in enumerate(result.clips):
        start_s, end_s = result.times_s[n]
        rows.append(
            {
                "clip_index": spec.clip_index,
                "temporal_view": spec.temporal_view,
                "spatial_crop": spec.spatial_crop,
                "frame_indices": list(spec.frame_indices),
                "start_frame": spec.frame_indices[0],
                "end_frame": spec.frame_indices[-1],
                "start_s": start_s,
                "end_s": end_s,
                "padded": spec.padded,
                "thumbnail": result.thumbnails[n] if result.thumbnails else None,
            }
        )
    return rows


def index_shard(
    tasks: Iterable[VideoTask],
    settings: ExtractSettings,
    classifier: Any,
    *,
    batch_size: int,
    run_extracts: RunExtracts | None = None,
) -> ShardOutput:
    """Decode, classify and tabulate every video of a shard. Bad videos become error rows."""
    started = time.perf_counter()
    states = {t.video_id: _VideoState(t) for t in tasks}
    queue: deque = deque(ExtractRequest(video=s.task) for s in states.values())
    batcher = _Batcher(classifier, batch_size)
    decode_s = 0.0
    for result in (run_extracts or run_extracts_inline(settings))(queue):
        state = states[result.request.video.video_id]
        decode_s += result.decode_s
        state.recovered.extend(result.recovered)
        if result.request.chunk == 0:
            state.first = result
        if result.error is not None:
            state.error = state.error or result.error
            continue
        if state.error is not None:
            continue  # an earlier chunk already failed this video
        if result.request.chunk == 0:
            queue.extend(follow_up_requests(result, settings.decode.chunk_clips))
        rows = _clip_rows(result)
        state.clips.extend(rows)
        batcher.add(state, rows, result.frames)
        result.frames = None
    batcher.flush()
    info = classifier.info
    tables = {
        "clips": _clips_table(states.values(), info),
        "videos": _videos_table(states.values(), info),
        "errors": _errors_table(states.values()),
    }
    stats = {
        **stats_from_tables(tables),
        "decode_s": round(decode_s, 3),
        "infer_s": round(batcher.infer_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "bytes_in": int(sum(s.first.size_bytes or 0 for s in states.values() if s.first is not None)),
    }
    return ShardOutput(tables=tables, stats=stats)


def _clips_table(states: Iterable[_VideoState], info: Any) -> pa.Table:
    labels = info.id2label
    records = []
    for state in sorted(states, key=lambda s: s.task.uri):
        if state.error is not None:
            continue
        for row in sorted(state.clips, key=lambda r: r["clip_index"]):
            ids = [int(i) for i in row["topk_ids"]]
            records.append(
                {
                    **row,
                    "video_id": state.task.video_id,
                    "uri": state.task.uri,
                    "label": labels[ids[0]],
                    "label_id": ids[0],
                    "score": float(row["topk_scores"][0]),
                    "topk_labels": [labels[i] for i in ids],
                    "topk_ids": ids,
                    "topk_scores": [float(s) for s in row["topk_scores"]],
                    "logits": row["logits"].astype(np.float32),
                    "embedding": row["embedding"].astype(np.float32),
                    "model": info.tag,
                }
            )
    schema = clips_schema(info.num_labels, info.embed_dim)
    if not records:
        return schema.empty_table()
    columns = {f.name: [r[f.name] for r in records] for f in schema}
    for name, width in (("logits", info.num_labels), ("embedding", info.embed_dim)):
        flat = pa.array(np.stack(columns[name]).reshape(-1), pa.float32())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.table(columns, schema=schema)


def _video_row(state: _VideoState, info: Any) -> dict[str, Any]:
    meta = state.first.meta if state.first is not None else None
    row: dict[str, Any] = {
        "video_id": state.task.video_id,
        "uri": state.task.uri,
        "size_bytes": state.first.size_bytes if state.first is not None else state.task.size_bytes,
        "mtime": state.task.mtime,
        "num_clips": 0,
        "status": STATUS_OK,
        "model": info.tag,
        "extra": state.task.extra,
    }
    if meta is not None:
        row.update(duration_s=meta.duration_s, fps=meta.fps, frames=meta.frames, width=meta.width,
                   height=meta.height, rotation=meta.rotation, codec=meta.codec, decoder=meta.decoder)  # fmt: skip
    if state.error is not None:
        row.update(status=STATUS_ERROR, error_type=state.error.error_type, error_message=str(state.error))
        return row
    mean = np.mean(np.stack(state.probs), axis=0) if state.probs else None
    if mean is not None:
        best = int(np.argmax(mean))
        row.update(
            num_clips=len(state.clips), label=info.id2label[best], label_id=best, score=float(mean[best])
        )
    return row


def _videos_table(states: Iterable[_VideoState], info: Any) -> pa.Table:
    rows = [_video_row(s, info) for s in sorted(states, key=lambda s: s.task.uri)]
    return pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA)


def _errors_table(states: Iterable[_VideoState]) -> pa.Table:
    rows = []
    for state in sorted(states, key=lambda s: s.task.uri):
        events = [(e, False) for e in state.recovered] + ([(state.error, True)] if state.error else [])
        for err, fatal in events:
            rows.append(
                {
                    "video_id": state.task.video_id,
                    "uri": state.task.uri,
                    "stage": err.stage,
                    "decoder": getattr(err, "decoder", None),
                    "error_type": err.error_type,
                    "error_message": str(err),
                    "fatal": fatal,
                }
            )
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


TABLE_ORDER = {"clips": [("uri", "ascending"), ("clip_index", "ascending")], "videos": [("uri", "ascending")],
               "errors": [("uri", "ascending")]}  # fmt: skip


def replace_videos(
    old: dict[str, pa.Table], new: dict[str, pa.Table], video_ids: Iterable[str]
) -> dict[str, pa.Table]:
    """A shard's tables with the rows of ``video_ids`` replaced by freshly indexed ones.

    Rows end in the order a clean run writes them (sorts are stable), so a retried shard is identical
    to a shard whose videos all succeeded the first time.
    """
    import pyarrow.compute as pc

    ids = pa.array(sorted(set(video_ids)), pa.string())
    merged = {}
    for name, table in old.items():
        table = table.select(new[name].column_names).cast(new[name].schema)
        kept = table.filter(pc.invert(pc.is_in(table["video_id"], value_set=ids)))
        merged[name] = pa.concat_tables([kept, new[name]]).sort_by(TABLE_ORDER[name])
    return merged


def stats_from_tables(tables: dict[str, pa.Table]) -> dict[str, Any]:
    """Video and clip counts of a shard, derived from its tables."""
    import pyarrow.compute as pc

    videos = tables["videos"]
    ok = int(pc.sum(pc.equal(videos["status"], STATUS_OK)).as_py() or 0)
    return {
        "videos": videos.num_rows,
        "videos_ok": ok,
        "videos_error": videos.num_rows - ok,
        "clips": tables["clips"].num_rows,
    }
