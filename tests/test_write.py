"""Parquet writing: row groups from the configured size, never a half-written file visible to readers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from videoindex import storage
from videoindex.format.tables import parquet_bytes


def test_row_groups_follow_the_size_not_the_batches(tmp_path: Path) -> None:
    """A shard's table arrives in many chunks (its batches); row groups still follow row_group_size."""
    batches = [pa.table({"x": pa.array(range(i * 10, i * 10 + 10))}) for i in range(25)]
    table = pa.concat_tables(batches)  # 25 chunks of 10 rows, as a shard's batches arrive
    assert table["x"].num_chunks == 25
    path = tmp_path / "t.parquet"
    path.write_bytes(parquet_bytes(table, {b"k": b"v"}, row_group_size=100))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100, 100, 50]
    assert pq.read_table(path)["x"].to_pylist() == list(range(250))


def test_interrupted_write_leaves_only_a_hidden_temp_file(tmp_path: Path, monkeypatch) -> None:
    fs, root = storage.filesystem(str(tmp_path))
    target = storage.join(root, "videos/shard=00000/part-00000.parquet")
    storage.write_bytes(fs, target, parquet_bytes(pa.table({"x": [1, 2]}), {}, row_group_size=10))

    def killed(*args, **kwargs):
        raise PermissionError("process killed before the rename")

    monkeypatch.setattr(storage.os, "replace", killed)
    monkeypatch.setattr(storage.os, "remove", killed)  # a killed process cleans nothing up
    with pytest.raises(PermissionError):
        storage.write_bytes(fs, storage.join(root, "videos/shard=00001/part-00001.parquet"), b"PAR1 half")
    leftovers = [p.name for p in (tmp_path / "videos").rglob("*") if p.is_file()]
    assert len(leftovers) == 2 and any(n.startswith(".part-00001.parquet.tmp-") for n in leftovers)
    # pyarrow's dataset discovery skips dot files: readers see only the whole file
    assert ds.dataset(tmp_path / "videos", partitioning="hive").to_table()["x"].to_pylist() == [1, 2]


def test_a_withdrawn_commit_stays_withdrawn_until_a_later_attempt_commits(tmp_path: Path) -> None:
    """(Outputs of versions that rewrote files in place.) A rewrite killed between its `uncommitted` event
    and its commit leaves half-rewritten files: the shard is not committed, also while the next attempt
    (which writes no withdrawal of its own) runs or after it failed, until an attempt commits; the same
    when read through a checkpoint."""
    from videoindex import storage
    from videoindex.format.ledger import Ledger, attempt_key

    ledger = Ledger(*storage.filesystem(str(tmp_path)))
    ledger.event(attempt_key(1, 1), 0, 1, "started", {})
    ledger.event(attempt_key(1, 1), 0, 1, "committed", {"videos": 1})
    ledger.event(attempt_key(2, 1), 0, 2, "started", {})
    ledger.event(attempt_key(2, 1), 0, 2, "uncommitted", {})  # killed here
    assert ledger.view().state(0).status == "running" and not ledger.view().committed()
    ledger.event(attempt_key(3, 1), 0, 3, "started", {})  # the resume's attempt: a whole-shard rewrite
    assert not ledger.view().committed()
    ledger.write_checkpoint(ledger.view())
    assert not ledger.view().committed()
    ledger.event(attempt_key(3, 1), 0, 3, "failed", {"reason": "node lost", "final": True})
    assert ledger.view().state(0).status in ("running", "failed") and not ledger.view().committed()
    ledger.event(attempt_key(4, 1), 0, 4, "started", {})
    ledger.event(attempt_key(4, 1), 0, 4, "committed", {"videos": 1})
    ledger.write_checkpoint(ledger.view())
    assert ledger.view().committed() == {0} and ledger.view().state(0).stats["videos"] == 1


def test_checkpoint_count_columns_spare_readers_the_stats_json(tmp_path: Path) -> None:
    """A checkpoint holds the numbers readers add up as columns: totals, busy span, generation and version
    come from them with no stats parsed, equal to those of the log; stats still parse on demand; a
    checkpoint written before those columns existed gives the same answers from its stats."""
    from videoindex.format.ledger import COUNT_KEYS, Ledger, attempt_key, committed_totals

    ledger = Ledger(*storage.filesystem(str(tmp_path)))
    for shard in range(3):
        stats = {"videos": 2, "videos_ok": 1, "videos_error": 1, "clips": 5 + shard, "duration_s_ok": 1.5,
                 "started_at": 10.0 + shard, "finished_at": 20.0 + shard, "generation": shard, "version": 2 * shard,
                 "clip_labels": {"3": 5}}  # fmt: skip
        ledger.event(attempt_key(1, shard + 1), shard, 1, "committed", stats)
    from_log = ledger.view()
    expected = committed_totals(from_log.committed_stats())
    assert expected == ({"videos": 6, "videos_ok": 3, "videos_error": 3, "clips": 18}, 12.0)
    ledger.write_checkpoint(from_log)

    view = ledger.view()
    assert committed_totals(view.committed_counts()) == expected
    assert [(view.state(s).generation, view.state(s).version) for s in range(3)] == [(0, 0), (1, 2), (2, 4)]
    assert all(state._stats_json is not None for state in view.shards.values())  # none parsed
    assert view.state(1).stats == from_log.state(1).stats

    (path,) = (tmp_path / "_ledger" / "checkpoints").glob("*.parquet")
    pq.write_table(pq.read_table(path).drop_columns(list(COUNT_KEYS)), path)
    old = ledger.view()
    assert committed_totals(old.committed_counts()) == expected
    assert old.committed_versions() == {0: 0, 1: 2, 2: 4}


def test_a_commit_removes_older_versions_only(tmp_path: Path) -> None:
    """After version 4 of a shard commits, versions 0 and 2 of its files go; version 6 (an attempt thought
    lost that may still commit and win) and files that are not table files stay."""
    from videoindex.format.layout import file_version, table_file
    from videoindex.format.tables import remove_superseded

    fs, root = storage.filesystem(str(tmp_path))
    for version in (0, 2, 4, 6):
        for table in ("clips", "videos", "errors"):
            storage.write_bytes(fs, storage.join(root, table_file(table, 7, version)), b"PAR1")
    (tmp_path / "clips" / "shard=00007" / ".part-00007-v0005.parquet.tmp-1").write_bytes(b"")
    removed = remove_superseded(fs, root, 7, 4)
    assert (
        sorted(Path(p).name for p in removed) == ["part-00007-v0002.parquet"] * 3 + ["part-00007.parquet"] * 3
    )
    left = sorted(p.name for p in (tmp_path / "clips" / "shard=00007").iterdir())
    assert left == [".part-00007-v0005.parquet.tmp-1", "part-00007-v0004.parquet", "part-00007-v0006.parquet"]
    assert [file_version(n) for n in left] == [None, 4, 6]


def test_an_attempt_that_committed_before_it_was_lost_counts_as_done(tmp_path: Path) -> None:
    """An attempt whose actor died after its commit event was written is not retried: a retry would
    rewrite the shard from the version that commit superseded (and deleted)."""
    from videoindex.format.ledger import Ledger, attempt_key
    from videoindex.job.queue import ShardQueue
    from videoindex.stages.plan import make_plan

    ledger = Ledger(*storage.filesystem(str(tmp_path)))
    rows = [{"uri": f"/v/{n}.mp4", "size_bytes": 1, "mtime": None, "extra": None} for n in range(4)]
    queue = ShardQueue(ledger, make_plan(rows, 2), max_attempts=3, run=1)
    queue.add(0, 1)
    queue.add(1, 1)
    first, second = queue.pop(), queue.pop()
    ledger.event(first.key, 0, 1, "committed", {"videos": 2, "version": 0})
    queue.fail(first, "actor died")
    queue.fail(second, "actor died")
    assert queue.committed == {0: ledger.committed_record(attempt_key(1, 1), 0, 1)}
    assert [(w.shard, w.attempt) for w in queue.pending] == [(1, 2)]
    assert ledger.view().state(0).status == "committed" and ledger.view().state(0).failed_attempts == 0
