"""Compaction (format/compaction.py): the same rows from a few files, through rewrites, crashes and damage."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLES
from tests.helpers import small_job_config, videos_by_name
from tests.synthetic_index import RUN, write_synthetic_index
from videoindex import storage
from videoindex.cli import main
from videoindex.format import compaction, layout
from videoindex.format.compaction import COMPACTED_DIR, EMBEDDINGS, MANIFESTS, compact, read_manifest
from videoindex.format.ledger import Ledger, attempt_key
from videoindex.format.tables import stats_from_tables
from videoindex.job.resume import failed_videos
from videoindex.job.run import run_job
from videoindex.query import open_index
from videoindex.report import _neighbours


def _rows(root: str | Path, *, compacted: bool = True) -> dict:
    """Everything a reader answers from the videos and errors tables (not from the ledger's stats);
    ``compacted=False``: from the per-shard files alone, the truth."""
    with open_index(str(root)) as idx:
        if not compacted:
            idx.manifest = None
        return {
            "videos": idx.sql("SELECT * FROM videos ORDER BY video_id").to_pylist(),
            "errors": idx.sql("SELECT * FROM errors ORDER BY ALL").to_pylist(),
            "by_shard": idx.sql(
                "SELECT shard, count(*) AS n FROM videos GROUP BY shard ORDER BY shard"
            ).to_pylist(),
        }


def _files_read(root: str | Path, table: str) -> list[str]:
    with open_index(str(root)) as idx:
        return [Path(f).relative_to(root).as_posix() for f in idx.dataset(table).files]


@pytest.fixture()
def index(tmp_path: Path) -> Path:
    root = tmp_path / "index"
    write_synthetic_index(
        str(root), videos=240, clips_per_video=2, shards=80, error_videos=24, recovered_every=5
    )
    return root


def test_a_compacted_index_reads_the_same_rows_from_a_few_files(index, monkeypatch, capsys):
    before = _rows(index)
    assert len(_files_read(index, "videos")) == 80
    monkeypatch.setattr(compaction, "SHARDS_PER_FILE", 32)
    assert main(["compact", str(index), "--min-shards", "100"]) == 0  # 80 uncovered: too few
    assert "nothing to compact: 80" in capsys.readouterr().out
    assert main(["compact", str(index)]) == 0
    # 3 each of videos, errors, label bounds and clip embeddings
    assert "compacted 80 shards into 12 files" in capsys.readouterr().out
    assert _rows(index) == before
    read = _files_read(index, "videos")
    assert len(read) == 3 and all(f.startswith(f"{COMPACTED_DIR}/videos/") for f in read)
    assert len(_files_read(index, "clips")) == 80  # clips are not compacted
    manifest = read_manifest(*storage.filesystem(str(index)))
    holds = [sorted(manifest.files[f]) for f in read]  # whole shards, cut at shard boundaries
    assert sorted(s for shards in holds for s in shards) == list(range(80))
    assert [len(shards) for shards in holds] == [32, 32, 16]
    # the per-shard files' metadata travels along (model tag, label map)
    meta = pq.read_schema(index / read[0]).metadata
    assert (
        meta[b"videoindex.model"]
        == pq.read_schema(next((index / "videos").rglob("*.parquet"))).metadata[b"videoindex.model"]
    )
    assert compact(*storage.filesystem(str(index))).seq is None  # nothing new: nothing written
    assert main(["compact", str(index / "nope")]) == 2


def test_crashes_damage_and_lost_files_leave_the_same_rows(index, monkeypatch, caplog):
    fs, root = storage.filesystem(str(index))
    before = _rows(index)
    real_write = storage.write_bytes

    def die_at_manifest(fs_, path, data):
        if f"/{MANIFESTS}/" in path:
            raise OSError("killed before the manifest")
        real_write(fs_, path, data)

    monkeypatch.setattr(storage, "write_bytes", die_at_manifest)
    with pytest.raises(OSError, match="killed"):
        compact(fs, root)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    assert len(list((index / COMPACTED_DIR).rglob("*.parquet"))) == 4  # written, never named
    assert _rows(index) == before and len(_files_read(index, "videos")) == 80

    writing = index / COMPACTED_DIR / "videos" / ".00000000-0000-0a0b0c0d.parquet.tmp-5f"  # being written
    writing.write_bytes(b"half")
    first = compact(fs, root)
    assert first.seq == 1 and first.files_deleted == 0  # the orphans have seq 1, not below it
    assert _rows(index) == before and len(_files_read(index, "videos")) == 1

    # a compacted file lost from storage: readers go back to the shards' own files; compaction heals
    lost = index / _files_read(index, "errors")[0]
    lost.unlink()
    assert _rows(index) == before and len(_files_read(index, "errors")) == 80
    second = compact(fs, root)
    assert second.seq == 2 and second.shards_pending == 80 and second.files_written == 1  # errors only
    assert _rows(index) == before and len(_files_read(index, "errors")) == 1
    assert second.files_deleted == 4  # the orphans of the killed compaction (seq 1, never named)
    assert writing.exists()  # perhaps still being written: kept

    # a damaged newest manifest: a warning, and the one before it answers
    (index / MANIFESTS / "00000002.parquet").write_bytes(b"PAR1 torn")
    with caplog.at_level(logging.WARNING, logger="videoindex.format.compaction"):
        assert _rows(index) == before
    assert "unreadable" in caplog.text
    assert len(_files_read(index, "videos")) == 1 and len(_files_read(index, "errors")) == 80

    # a clean-up that dies: only unread files stay behind
    def die_deleting(self, path):
        raise OSError("killed while deleting")

    real_rm = type(fs).rm_file
    monkeypatch.setattr(type(fs), "rm_file", die_deleting)
    third = compact(fs, root)
    assert third.seq == 3 and third.files_deleted == 0
    assert _rows(index) == before and len(_files_read(index, "errors")) == 1

    # a temporary file of ours an hour old was left by a compaction that died while writing: deleted
    monkeypatch.setattr(type(fs), "rm_file", real_rm)
    for seq in (2, 3):  # (and the damaged manifest: while one is unreadable nothing is deleted)
        (index / MANIFESTS / f"0000000{seq}.parquet").unlink()
    hour_ago = time.time() - compaction.TEMP_MAX_AGE_S - 60
    os.utime(writing, (hour_ago, hour_ago))
    fourth = compact(fs, root)
    assert fourth.seq == 2 and not writing.exists()
    assert _rows(index) == before


def test_a_retried_video_replaces_its_compacted_row(tiny_model_dir, tmp_path):
    """A local job that compacts at its end; a video that failed is repaired and retried: readers see its
    new row (from its shard's own files, the compacted copy being stale), never both, until the next
    compaction copies it."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        shutil.copy(SAMPLES / "demo.mp4", folder / f"v{i}.mp4")
    (folder / "v1.mp4").write_bytes(b"this is not a video\n" * 50)
    output = tmp_path / "out"
    config = small_job_config(folder, output, tiny_model_dir, **{
        "output.shard_size": 1, "output.compact_min_shards": 3})  # fmt: skip
    assert run_job(config).exit_code == 1
    assert len(_files_read(output, "videos")) == 1  # compacted at the job's end
    assert videos_by_name(output)["v1.mp4"]["status"] == "error"
    with open_index(str(output)) as idx:
        assert idx.sql("SELECT status FROM videos WHERE uri LIKE '%v1.mp4'").column(0).to_pylist() == [
            "error"
        ]

    shutil.copy(SAMPLES / "demo.mp4", folder / "v1.mp4")
    again = config.replace(output=dataclasses.replace(config.output, compact_min_shards=0))
    assert run_job(again, resume=True, retry_all_errors=True).exit_code == 0
    read = _files_read(output, "videos")
    assert len(read) == 3 and not any(f.startswith(COMPACTED_DIR) for f in read)  # the whole file is stale
    with open_index(str(output)) as idx:
        statuses = idx.sql("SELECT uri, status FROM videos ORDER BY uri").to_pylist()
    assert [(Path(r["uri"]).name, r["status"]) for r in statuses] == [
        ("v0.mp4", "ok"),
        ("v1.mp4", "ok"),
        ("v2.mp4", "ok"),
    ]
    assert compact(*storage.filesystem(str(output))).seq == 2
    assert len(_files_read(output, "videos")) == 1
    with open_index(str(output)) as idx:
        assert idx.sql("SELECT count(*) FROM videos WHERE status = 'ok'").column(0).to_pylist() == [3]


def _search_by_scan(root: Path, names: list[str], min_score: float, limit: int) -> list[dict]:
    """The answer by definition: every committed clip, in DuckDB."""
    marks = ", ".join(f"'{n}'" for n in names)
    with open_index(str(root)) as idx:
        return idx.sql(
            f"SELECT uri, video_id, clip_index, start_s, end_s, label, score FROM clips WHERE label IN ({marks}) "
            f"AND score >= {min_score} ORDER BY score DESC, video_id, clip_index LIMIT {limit}"
        ).to_pylist()


def test_a_label_search_on_a_compacted_index_reads_few_shards_for_the_same_answer(tmp_path):
    root = tmp_path / "index"
    info = write_synthetic_index(
        str(root), videos=400, clips_per_video=3, shards=200, uncommitted_shards=(7,)
    )
    fs, path = storage.filesystem(str(root))
    assert compact(fs, path).seq == 1
    # shard 7 commits after the compaction: no bounds cover it, so every search reads it
    Ledger(fs, path).event(attempt_key(RUN, 1000), 7, 1, "committed", {"shard": 7, "attempt": 1})
    names = sorted(set(info["id2label"].values()))
    with open_index(str(root)) as idx:
        some = idx.sql(
            "SELECT label, max(score) AS best FROM clips GROUP BY label ORDER BY best DESC"
        ).to_pylist()
        late = idx.sql("SELECT label FROM clips WHERE shard = 7 LIMIT 1").column(0)[0].as_py()

    def containing(text: str) -> list[str]:
        return [n for n in names if text.lower() in n.lower()]

    queries = [  # (search text, the labels it matches, min_score, limit)
        (some[0]["label"], [some[0]["label"]], 0.0, 5),  # the label with the best clip of all
        (some[-1]["label"], [some[-1]["label"]], 0.0, 100),
        ("Pushing", containing("Pushing"), 0.0, 10),  # several labels
        ("a", containing("a"), 0.0, 60),  # most clips match: the best 60 need several rounds of shards
        (some[0]["label"], [some[0]["label"]], some[0]["best"], 3),  # only the very best clip qualifies
        (some[0]["label"], [some[0]["label"]], some[0]["best"] + 0.01, 3),  # nothing qualifies
        (late, [late], 0.0, 1000),  # every clip of a label shard 7 holds
    ]
    for text, labels, min_score, limit in queries:
        with open_index(str(root)) as idx:
            found = idx.search(text, min_score=min_score, limit=limit)
            read = idx.search_shards_read
        assert found.to_pylist() == _search_by_scan(root, labels, min_score, limit), (text, min_score, limit)
        assert 1 <= read <= 1 + 16 + 32 + 64, (text, min_score, limit, read)  # of 200 shards
    with open_index(str(root)) as idx:  # before any compaction, every shard is read
        idx.manifest = None
        idx.search(some[0]["label"], limit=5)
        assert idx.search_shards_read == 200


def test_a_shard_committed_again_at_the_same_version_is_not_read_from_its_old_copy(tmp_path):
    """A shard whose commit was withdrawn (an older in-place writer) is written again as version 0 by a
    later attempt: the compacted copy names the same version but another commit, so readers, the next
    compaction and resume's failed-video scan take the shard's own new files."""
    root = tmp_path / "index"
    write_synthetic_index(str(root), videos=40, clips_per_video=2, shards=10, error_videos=10)
    fs, path = storage.filesystem(str(root))
    assert compact(fs, path).seq == 1
    shard, ledger = 3, Ledger(fs, path)
    ledger.event(attempt_key(RUN + 1, 1), shard, 2, "uncommitted", {})
    tables = {t: pq.read_table(root / layout.table_file(t, shard)) for t in layout.TABLES}
    videos = tables["videos"]
    assert "error" in videos["status"].to_pylist()
    ok = pa.array(["ok"] * videos.num_rows)
    tables["videos"] = videos.set_column(videos.schema.get_field_index("status"), "status", ok)
    for table, rows in tables.items():
        pq.write_table(rows, root / layout.table_file(table, shard))  # version 0 again, in place
    ledger.event(attempt_key(RUN + 2, 1), shard, 3, "committed",
                 {"shard": shard, "attempt": 3, "version": 0, **stats_from_tables(tables)})  # fmt: skip
    with open_index(str(root)) as idx:
        statuses = idx.sql(f"SELECT DISTINCT status FROM videos WHERE shard = {shard}").column(0).to_pylist()
        assert statuses == ["ok"]
    assert not failed_videos(fs, path, Ledger(fs, path).view().committed_commits(), all_errors=True).get(
        shard
    )
    again = compact(fs, path)
    assert again.seq == 2 and again.shards_pending == 10  # the stale file's ten shards, copied anew
    with open_index(str(root)) as idx:
        assert idx.sql(f"SELECT DISTINCT status FROM videos WHERE shard = {shard}").column(0).to_pylist() == [
            "ok"
        ]
        assert all(f.startswith(str(root / COMPACTED_DIR)) for f in idx.dataset("videos").files)


def test_a_manifest_that_failed_to_read_keeps_its_files(tmp_path, monkeypatch):
    """The newest manifest cannot be read while a compaction starts (storage failing): the compaction
    works from the one before, and its clean-up, which reads the manifests again, keeps every file the
    newest names (deleting them would break readers that hold it)."""
    root = tmp_path / "index"
    write_synthetic_index(str(root), videos=48, clips_per_video=2, shards=12, uncommitted_shards=(10, 11))
    fs, path = storage.filesystem(str(root))
    ledger = Ledger(fs, path)
    assert compact(fs, path).seq == 1
    ledger.event(attempt_key(RUN, 900), 10, 1, "committed", {"shard": 10, "attempt": 1})
    assert compact(fs, path).seq == 2
    newest = read_manifest(fs, path)
    before = _rows(root)
    ledger.event(attempt_key(RUN, 901), 11, 1, "committed", {"shard": 11, "attempt": 1})
    real_cat, failed = type(fs).cat_file, []

    def fail_once(self, p, *args, **kwargs):
        if p.endswith("manifests/00000002.parquet") and not failed:
            failed.append(p)
            raise PermissionError("storage refused the read")
        return real_cat(self, p, *args, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", fail_once)
    third = compact(fs, path)
    assert failed and third.seq == 3
    assert all((root / f).exists() for f in newest.files), "files of an intact manifest were deleted"
    assert _rows(root) != before  # shard 11 is committed now
    with open_index(str(root)) as idx:
        assert idx.sql("SELECT count(DISTINCT shard) FROM videos").column(0).to_pylist() == [12]


def test_many_compactions_are_merged_into_few_files(tmp_path, monkeypatch):
    """Each compaction adds files; past MERGE_AFTER_FILES a table is copied anew into few files."""
    monkeypatch.setattr(compaction, "MERGE_AFTER_FILES", 2)
    root = tmp_path / "index"
    write_synthetic_index(str(root), videos=32, clips_per_video=2, shards=8, uncommitted_shards=(4, 5, 6, 7))
    fs, path = storage.filesystem(str(root))
    assert compact(fs, path).files_written == 4
    counts = []
    for shard in (4, 5, 6, 7):
        Ledger(fs, path).event(
            attempt_key(RUN, 900 + shard), shard, 1, "committed", {"shard": shard, "attempt": 1}
        )
        compact(fs, path)
        counts.append(len(_files_read(root, "videos")))
        assert _rows(root) == _rows(root, compacted=False)
    assert counts == [2, 1, 2, 1]  # at 2 files the next compaction copies the table anew into one


def test_similar_on_a_compacted_index_scans_few_files_for_the_same_answer(tmp_path, monkeypatch, capsys):
    """`similar` scans the compacted embeddings (files cut by the ledger's clip counts) and, for a shard
    committed since, its clips file: the same answer as a scan of every clips file. A compaction told
    not to copy embeddings drops the earlier copies; a later one copies them again, and nothing else."""
    monkeypatch.setattr(compaction, "EMBEDDINGS_FILE_CLIPS", 40)
    root = tmp_path / "index"
    info = write_synthetic_index(
        str(root), videos=120, clips_per_video=2, shards=20, error_videos=12, uncommitted_shards=(19,)
    )
    fs, path = storage.filesystem(str(root))
    ok = [v for v in info["video_ids"] if v not in set(info["error_video_ids"])]
    queries = [(ok[0], None), (ok[9], 1), (ok[-1], 0), (ok[40], None)]

    def answers(compacted: bool = True) -> tuple[list, list[str]]:
        with open_index(str(root)) as idx:
            if not compacted:
                idx.manifest = None
            found = [idx.similar(v, k=9, clip_index=c).to_pylist() for v, c in queries]
            return found, [Path(f).relative_to(root).as_posix() for f in idx.dataset(EMBEDDINGS).files]

    def neighbours(compacted: bool = True) -> list:  # the report's scan answers every query at once
        with open_index(str(root)) as idx:
            if not compacted:
                idx.manifest = None
            return _neighbours(idx, [(s, v, 0) for s, v in _shard_and_video(idx, ok[:3])], 5)

    before, files = answers()
    assert len(files) == 19 and all(f.startswith("clips/") for f in files)
    report_before = neighbours()
    assert len(report_before) == 3 and all(len(n["clips"]) == 6 for n in report_before)  # query + 5
    assert compact(fs, path).seq == 1
    after, files = answers()
    assert after == before
    assert neighbours() == report_before
    manifest = read_manifest(fs, path)
    copies = sorted(f for f, table in manifest.tables.items() if table == EMBEDDINGS)
    assert sorted(files) == copies and all(f.startswith(f"{COMPACTED_DIR}/{EMBEDDINGS}/") for f in copies)

    def cut_by_clips(copies: list[str], shards: int) -> None:
        """Whole shards a file, at most 40 clips unless one shard has more; every clip once."""
        manifest = read_manifest(fs, path)
        clips = {s: pq.read_metadata(root / layout.table_file("clips", s)).num_rows for s in range(shards)}
        for f in copies:
            assert sum(clips[s] for s in manifest.files[f]) <= 40 or len(manifest.files[f]) == 1
        assert -(-sum(clips.values()) // 40) <= len(copies) < shards
        assert sum(pq.read_metadata(root / f).num_rows for f in copies) == sum(clips.values())

    cut_by_clips(copies, 19)
    assert sum(pq.read_metadata(root / f).num_rows for f in copies) == info["clips"]

    Ledger(fs, path).event(attempt_key(RUN, 900), 19, 1, "committed", {"shard": 19, "attempt": 1})
    after, files = answers()
    assert after == answers(compacted=False)[0]
    assert sorted(files) == sorted([*copies, layout.table_file("clips", 19)])

    assert main(["compact", str(root), "--no-embeddings"]) == 0
    assert EMBEDDINGS not in read_manifest(fs, path).tables.values()
    after, files = answers()
    assert after == answers(compacted=False)[0]
    assert len(files) == 20 and all(f.startswith("clips/") for f in files)
    assert main(["compact", str(root)]) == 0  # as the last compaction was asked: without embeddings
    assert "nothing to compact" in capsys.readouterr().out
    # embeddings again: the other tables are covered (shard 19 is counted from its clips file)
    again = compact(fs, path)
    assert again.shards_pending == 20 and again.files_written == len(_groups_of(fs, path, EMBEDDINGS))
    cut_by_clips(_groups_of(fs, path, EMBEDDINGS), 20)
    assert main(["compact", str(root)]) == 0  # as the last compaction was asked: with embeddings
    assert "nothing to compact" in capsys.readouterr().out
    copies = _groups_of(fs, path, EMBEDDINGS)
    capsys.readouterr()
    # nothing new, but copies to drop: whatever --min-shards
    assert main(["compact", str(root), "--no-embeddings", "--min-shards", "1000"]) == 0
    assert f"no shard to copy; manifest {again.seq + 1} no longer names the embedding copies" in (
        capsys.readouterr().out
    )
    assert all((root / f).exists() for f in copies)  # a reader of the manifest before may be reading them
    assert main(["compact", str(root)]) == 0  # nothing to copy: the dropped copies are deleted all the same
    assert "nothing to compact" in capsys.readouterr().out
    assert not any((root / f).exists() for f in copies)
    assert not list((root / COMPACTED_DIR / EMBEDDINGS).glob("*.parquet"))
    videos = _files_read(root, "videos")  # shards 0-18, then shard 19: named again, not copied
    assert not _groups_of(fs, path, EMBEDDINGS) and len(videos) == 2
    assert all(f.startswith(f"{COMPACTED_DIR}/videos/0000000") for f in videos)
    assert answers()[0] == answers(compacted=False)[0]


def _shard_and_video(idx, video_ids: list[str]) -> list[tuple[int, str]]:
    found = idx.sql(
        f"SELECT shard, video_id FROM videos WHERE video_id IN ({', '.join(repr(v) for v in video_ids)})"
    )
    return sorted(zip(found["shard"].to_pylist(), found["video_id"].to_pylist(), strict=True))


def _groups_of(fs, path: str, table: str) -> list[str]:
    manifest = read_manifest(fs, path)
    return [f for f, t in manifest.tables.items() if t == table]


def test_a_merge_copies_anew_only_the_files_not_full_yet(tmp_path, monkeypatch):
    """Full files (SHARDS_PER_FILE shards, or half EMBEDDINGS_FILE_CLIPS clips) stay as they are through
    a merge: at scale the embeddings fill many files, and a merge must not copy them all again."""
    monkeypatch.setattr(compaction, "MERGE_AFTER_FILES", 2)
    monkeypatch.setattr(compaction, "SHARDS_PER_FILE", 2)
    root = tmp_path / "index"
    write_synthetic_index(str(root), videos=32, clips_per_video=2, shards=8, uncommitted_shards=(4, 5, 6, 7))
    fs, path = storage.filesystem(str(root))
    compact(fs, path)
    full = set(_files_read(root, "videos"))
    assert len(full) == 2  # shards 0-1 and 2-3
    for shard in (4, 5, 6):
        Ledger(fs, path).event(
            attempt_key(RUN, 900 + shard), shard, 1, "committed", {"shard": shard, "attempt": 1}
        )
        compact(fs, path)
    read = set(_files_read(root, "videos"))
    assert full <= read  # never copied again
    assert len(read) == 4  # + shards 4-5 (the merge of 4 and 5) + shard 6
    assert _rows(root) == _rows(root, compacted=False)
