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

    monkeypatch.setattr(fs, "mv", killed)
    with pytest.raises(PermissionError):
        storage.write_bytes(fs, storage.join(root, "videos/shard=00001/part-00001.parquet"), b"PAR1 half")
    leftovers = [p.name for p in (tmp_path / "videos").rglob("*") if p.is_file()]
    assert len(leftovers) == 2 and any(n.startswith(".part-00001.parquet.tmp-") for n in leftovers)
    # pyarrow's dataset discovery skips dot files: readers see only the whole file
    assert ds.dataset(tmp_path / "videos", partitioning="hive").to_table()["x"].to_pylist() == [1, 2]
