"""The query layer on real Parquet: every answer checked against plain pyarrow/numpy over the same files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.helpers import free_port
from tests.synthetic_index import write_synthetic_index
from videoindex.format.layout import table_file
from videoindex.query import NotAnIndexError, QueryError, open_index, register_query_cli, run_query_cli

SMALL = {"videos": 48, "clips_per_video": 6, "num_labels": 40, "embed_dim": 32, "shards": 6, "seed": 3}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("index")
    info = write_synthetic_index(str(root), **SMALL, uncommitted_shards=(2,), error_videos=6)
    return root, info


@pytest.fixture()
def index(built: tuple[Path, dict[str, Any]]):
    with open_index(str(built[0])) as idx:
        yield idx


def plain(built: tuple[Path, dict[str, Any]], table: str) -> pa.Table:
    """The committed shards' rows, read file by file with plain pyarrow (the oracle)."""
    root, info = built
    return pa.concat_tables(pq.read_table(root / table_file(table, s)) for s in info["committed_shards"])


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="videoindex")
    register_query_cli(parser.add_subparsers(dest="command", required=True))
    return run_query_cli(parser.parse_args(["query", *argv]))


def test_only_committed_shards_are_visible(built, index) -> None:
    root, info = built
    assert (root / table_file("clips", 2)).exists()  # written, never committed
    assert index.committed == info["committed_shards"]
    videos = index.dataset("videos").to_table()
    assert sorted(videos["video_id"].to_pylist()) == sorted(info["video_ids"])
    assert not set(info["hidden_video_ids"]) & set(videos["video_id"].to_pylist())
    assert index.dataset("clips").count_rows() == info["clips"] == plain(built, "clips").num_rows
    assert set(index.sql("SELECT DISTINCT shard FROM clips")["shard"].to_pylist()) == set(
        info["committed_shards"]
    )
    with pytest.raises(QueryError, match="no video"):
        index.video(info["hidden_video_ids"][0])


def test_summary(built, index) -> None:
    videos, clips = plain(built, "videos"), plain(built, "clips")
    ok = videos.filter(pc.equal(videos["status"], "ok"))
    row = index.summary().to_pylist()[0]
    expected = {
        "videos": videos.num_rows,
        "videos_ok": ok.num_rows,
        "videos_error": videos.num_rows - ok.num_rows,
        "clips": clips.num_rows,
        "hours": pytest.approx(pc.sum(ok["duration_s"]).as_py() / 3600),
        "model": built[1]["model_tag"],
        "random_weights": True,
        "labels_seen": len(set(clips["label"].to_pylist())),
        "shards_committed": len(built[1]["committed_shards"]),
        "shards_total": SMALL["shards"],
        "generation": 0,  # never updated (tests/test_update.py shows an updated index's)
        "last_update": None,
    }
    assert list(row) == list(expected)  # column order too
    assert row == expected
    assert row["videos_error"] > 0


def expected_counts(labels: list[str]) -> list[tuple[str, int, float]]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(label, n, n / len(labels)) for label, n in ordered]


def rows(table: pa.Table, *columns: str) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in columns), strict=True))


@pytest.mark.parametrize("level", ["clip", "video"])
def test_labels(built, index, level: str) -> None:
    if level == "clip":
        labels = plain(built, "clips")["label"].to_pylist()
    else:
        videos = plain(built, "videos")
        labels = videos.filter(pc.equal(videos["status"], "ok"))["label"].to_pylist()
    got = rows(index.labels(level), "label", "count", "share")
    assert got == [(lb, n, pytest.approx(s)) for lb, n, s in expected_counts(labels)]
    assert rows(index.labels(level, top=3), "label") == [(lb,) for lb, _, _ in expected_counts(labels)[:3]]
    with pytest.raises(QueryError, match="level"):
        index.labels("frame")


def test_search_matches_substring_case_insensitively(built, index) -> None:
    clips = plain(built, "clips")
    hit = [("push" in lb.lower()) and s >= 0.3 for lb, s in rows(clips, "label", "score")]
    expected = sorted(
        rows(clips.filter(pa.array(hit)), "score", "video_id", "clip_index"),
        key=lambda r: (-r[0], r[1], r[2]),
    )[:7]
    got = index.search("PUSH", min_score=0.3, limit=7)
    assert got.column_names == ["uri", "video_id", "clip_index", "start_s", "end_s", "label", "score"]
    assert rows(got, "score", "video_id", "clip_index") == expected
    assert all("push" in label.lower() for label in got["label"].to_pylist())


def test_search_unknown_label_suggests_closest(index) -> None:
    with pytest.raises(QueryError) as err:
        index.search("Pushng a cupp")
    message = str(err.value)
    assert "\n" not in message and "closest known labels" in message
    assert "'Pushing a cup'" in message
    assert message.count("'") == 2 * 6  # the query and five suggestions


def test_video_timeline_by_id_and_uri(built, index) -> None:
    clips = plain(built, "clips")
    vid = clips["video_id"][len(clips) // 2].as_py()
    mine = clips.filter(pc.equal(clips["video_id"], vid)).sort_by("clip_index")
    got = index.video(vid)
    columns = ["clip_index", "start_s", "end_s", "label", "score", "topk_labels", "topk_scores"]
    assert got.column_names == columns
    assert got.to_pylist() == mine.select(columns).to_pylist()
    assert index.video(mine["uri"][0].as_py()).to_pylist() == got.to_pylist()


def test_video_unknown_or_failed(built, index) -> None:
    with pytest.raises(QueryError, match="no video 'nope'"):
        index.video("nope")
    with pytest.raises(QueryError, match="it failed"):
        index.video(built[1]["error_video_ids"][0])


def numpy_nearest(clips: pa.Table, query: np.ndarray, exclude: Any, k: int) -> list[tuple[str, int]]:
    emb = clips["embedding"].combine_chunks().flatten().to_numpy().reshape(len(clips), -1)
    sims = emb @ query / (np.linalg.norm(emb, axis=1) * np.linalg.norm(query))
    sims[exclude] = -np.inf
    order = np.argsort(-sims, kind="stable")[:k]
    return [(clips["video_id"][i].as_py(), clips["clip_index"][i].as_py()) for i in order]


def test_similar_duplicate_is_top_and_ranks_match_numpy(built, index) -> None:
    (src, src_clip), twin = built[1]["duplicate"]
    got = index.similar(src, k=5, clip_index=src_clip)
    assert rows(got, "video_id", "clip_index")[0] == twin
    assert got["similarity"][0].as_py() == pytest.approx(1.0, abs=1e-5)
    clips = plain(built, "clips")
    ids, clip_ix = clips["video_id"].to_numpy(zero_copy_only=False), clips["clip_index"].to_numpy()
    me = np.flatnonzero((ids == src) & (clip_ix == src_clip))[0]
    query = clips["embedding"][me].values.to_numpy()
    assert rows(got, "video_id", "clip_index") == numpy_nearest(clips, query, me, 5)
    assert (src, src_clip) not in rows(got, "video_id", "clip_index")
    assert index.similar((src, src_clip), k=5).to_pylist() == got.to_pylist()


def test_similar_to_video_mean_excludes_the_video(built, index) -> None:
    clips = plain(built, "clips")
    vid = clips["video_id"][7].as_py()
    own = clips["video_id"].to_numpy(zero_copy_only=False) == vid
    emb = clips["embedding"].combine_chunks().flatten().to_numpy().reshape(len(clips), -1)
    got = index.similar(vid, k=4)
    assert rows(got, "video_id", "clip_index") == numpy_nearest(clips, emb[own].mean(axis=0), own, 4)
    with pytest.raises(QueryError, match="has no clip 99"):
        index.similar(vid, clip_index=99)


def test_errors(built, index) -> None:
    videos = plain(built, "videos")
    failed = videos.filter(pc.equal(videos["status"], "error"))
    expected: dict[str, list[str]] = {}
    for error_type, uri in rows(failed, "error_type", "uri"):
        expected.setdefault(error_type, []).append(uri)
    order = sorted(expected, key=lambda t: (-len(expected[t]), t))
    got = index.errors()
    assert rows(got, "error_type", "count", "example_uris") == [
        (t, len(expected[t]), sorted(expected[t])[:3]) for t in order
    ]


def test_sql_and_relation(built, index) -> None:
    got = index.sql("SELECT shard, count(*) AS n FROM clips GROUP BY shard ORDER BY shard")
    clips = plain(built, "clips")
    assert sum(got["n"].to_pylist()) == clips.num_rows
    assert index.relation("videos").count("*").fetchall()[0][0] == plain(built, "videos").num_rows
    with pytest.raises(QueryError, match="SQL error") as err:
        index.sql("SELEC label FROM clips")
    assert "\n" not in str(err.value)


def test_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(NotAnIndexError, match="no _job.json"):
        open_index(str(tmp_path))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("videoindex query: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["search", "zzzz"], "closest known labels"),
        (["video", "nope"], "no video"),
        (["sql", "SELECT FROM WHERE"], "SQL error"),
        (["summary", "--format", "parquet"], "--output FILE"),
        (["summary", "--storage-option", "novalue"], "KEY=VALUE"),
    ],
)
def test_cli_errors_are_one_line(built, capsys, argv: list[str], needle: str) -> None:
    assert cli([str(built[0]), *argv]) == 2
    assert needle in one_error_line(capsys)


def test_cli_not_an_index(tmp_path: Path, capsys) -> None:
    assert cli([str(tmp_path), "summary"]) == 2
    assert "no _job.json" in one_error_line(capsys)


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_cli_formats_round_trip(built, index, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"hits.{fmt}"
    vid = built[1]["video_ids"][0]
    assert cli([str(built[0]), "video", vid, "--format", fmt, "--output", str(out)]) == 0
    expected = index.video(vid)
    if fmt == "parquet":
        assert pq.read_table(out).equals(expected)
        return
    if fmt == "json":
        assert json.loads(out.read_text()) == expected.to_pylist()
        return
    import pyarrow.csv as pacsv

    back = pacsv.read_csv(out)
    assert back["clip_index"].to_pylist() == expected["clip_index"].to_pylist()
    assert back["label"].to_pylist() == expected["label"].to_pylist()
    assert [json.loads(v) for v in back["topk_labels"].to_pylist()] == expected["topk_labels"].to_pylist()
    assert np.allclose(back["score"].to_numpy(), expected["score"].to_numpy())


def test_cli_table_and_stdout(built, capsys) -> None:
    assert cli([str(built[0]), "labels", "--top", "2"]) == 0
    assert "label" in capsys.readouterr().out
    assert cli([str(built[0]), "summary", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["shards_total"] == SMALL["shards"]
    assert (
        cli(
            [
                str(built[0]),
                "similar",
                built[1]["video_ids"][0],
                "--clip-index",
                "1",
                "-k",
                "3",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


@pytest.fixture()
def moto_s3(monkeypatch: pytest.MonkeyPatch):
    """An S3 endpoint served by moto in this process; yields its URL."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._port}"
    finally:
        server.stop()


def test_s3_output(moto_s3: str, built, index, capsys) -> None:
    import s3fs

    options = {"client_kwargs": {"endpoint_url": moto_s3}, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bucket")
    write_synthetic_index("bucket/index", fs=fs, **SMALL, uncommitted_shards=(2,), error_videos=6)
    with open_index("s3://bucket/index", options) as remote:
        summary = index.summary().to_pylist()[0]
        assert remote.summary().to_pylist() == [{**summary, "hours": pytest.approx(summary["hours"])}]
        assert remote.search("pull", limit=5).to_pylist() == index.search("pull", limit=5).to_pylist()
        (src, clip), _ = built[1]["duplicate"]
        assert (
            remote.similar(src, k=3, clip_index=clip).to_pylist()
            == index.similar(src, k=3, clip_index=clip).to_pylist()
        )
        assert remote.video(src).to_pylist() == index.video(src).to_pylist()
    argv = [
        "s3://bucket/index",
        "errors",
        "--format",
        "json",
        "--storage-option",
        "key=testing",
        "--storage-option",
        "secret=testing",
        "--storage-option",
        "client_kwargs=" + json.dumps(options["client_kwargs"]),
    ]
    assert cli(argv) == 0
    assert json.loads(capsys.readouterr().out) == index.errors().to_pylist()


def test_readers_load_no_decoder_no_torch_no_ray(built) -> None:
    """status, query and report run on the output format alone: a fresh process that runs each of them
    imports no torch, no decoder and no Ray (readers of a big index start in a fraction of a second)."""
    import subprocess
    import sys

    root = str(built[0])
    script = (
        "import contextlib, io, sys\n"
        "from videoindex.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['status', {root!r}]) == 0\n"
        f"    assert main(['query', {root!r}, 'summary']) == 0\n"
        f"    assert main(['query', {root!r}, 'labels', '--top', '3']) == 0\n"
        "from videoindex.report import build_context\n"
        "from videoindex.query import open_index\n"
        f"with open_index({root!r}) as index:\n"
        "    build_context(index, sample_videos=0, neighbours=0, seed=0)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'av', 'decord', 'ray') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_answers_from_shard_stats_equal_answers_from_the_tables(tmp_path: Path) -> None:
    """summary, labels and errors come from the ledger's shard stats (the summary from the checkpoint's
    count and label-mask columns alone); an index whose stats hold only counts (written by videoindex 0.1)
    is answered from the tables, with the same result."""
    from videoindex.report import _errors as report_error_sections

    answers, report_errors = [], []
    for counts_only in (False, True):
        root = tmp_path / f"index-{counts_only}"
        write_synthetic_index(
            str(root),
            **SMALL,
            uncommitted_shards=(2,),
            error_videos=12,
            counts_only=counts_only,
            recovered_every=7,
        )
        with open_index(str(root)) as index:
            assert (index._summary_from_stats() is None) is counts_only
            if not counts_only:  # the summary came from the checkpoint's columns: no stats JSON parsed
                states = [st for st in index.ledger.shards.values() if st.status == "committed"]
                assert states and all(st._stats_json is not None for st in states)
            answers.append([index.summary(), index.labels("clip", 5), index.labels("video"), index.errors()])
            report_errors.append(report_error_sections(index))
    assert report_errors[0] == report_errors[1]  # the report's error sections too
    assert report_errors[0]["recovered"][0]["count"] > 0 and report_errors[0]["fatal"][0]["examples"]
    for from_stats, from_tables in zip(*answers, strict=True):
        assert from_stats.column_names == from_tables.column_names
        for name in from_stats.column_names:
            a, b = from_stats[name].to_pylist(), from_tables[name].to_pylist()
            assert a == pytest.approx(b) if isinstance(a[0], float) else a == b, name
