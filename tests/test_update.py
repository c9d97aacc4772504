"""`videoindex run INPUT OUTPUT --update`: only what changed is indexed, and the index then equals a fresh
index of the collection as it is now (local executor, real videos, real Parquet)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.helpers import cli_job_yaml, small_job_config, wait_for
from tests.videogen import write_index_video
from videoindex import storage
from videoindex.cli import main
from videoindex.format.jobrecord import JobMismatchError, read_job
from videoindex.format.ledger import Ledger
from videoindex.job.run import run_job
from videoindex.job.update import UpdateError
from videoindex.query import open_index
from videoindex.stages.plan import PlanError
from videoindex.status import job_status

REPO = Path(__file__).resolve().parents[1]
SORT = {"clips": ["uri", "clip_index"], "videos": ["uri"], "errors": ["uri", "stage"]}


def _video(path: Path, frames: int, *, mtime: float | None = None) -> Path:
    write_index_video(path, frames=frames, size=(64, 48))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _collection(folder: Path) -> None:
    """Five videos (shards of two: three shards), one of them not a video."""
    folder.mkdir(parents=True)
    for name, frames in (("a", 20), ("b", 24), ("c", 28), ("d", 32)):
        _video(folder / f"{name}.mp4", frames, mtime=1_700_000_000)
    (folder / "e.mp4").write_bytes(b"not a video at all")
    os.utime(folder / "e.mp4", (1_700_000_000, 1_700_000_000))


def _change(folder: Path) -> None:
    """b rewritten (other frames, new mtime), d deleted, f and g new."""
    _video(folder / "b.mp4", 36, mtime=1_800_000_000)
    (folder / "d.mp4").unlink()
    _video(folder / "f.mp4", 16)
    _video(folder / "g.mp4", 40)


SLOWED = "tests.faulty_decoder:open_faulty"  # PyAV, after a sleep where a VIDEO.slow file says so


def _config(folder: Path, output: Path, model: Path, **extra):
    return small_job_config(folder, output, model, **{"sampling.clip_stride": 2, **extra})


def _rows(output: Path) -> dict[str, list[dict]]:
    """Every table's rows without the shard (a fresh index numbers its shards otherwise), in one order."""
    found = {}
    for table, keys in SORT.items():
        data = ds.dataset(output / table, partitioning="hive").to_table()
        found[table] = data.drop_columns(["shard"]).sort_by([(k, "ascending") for k in keys]).to_pylist()
    return found


FLOAT_TOLERANCE = 1e-6  # logits, scores, embeddings: a clip batched with other clips differs in the last bits


def _assert_same_rows(got: dict[str, list[dict]], want: dict[str, list[dict]]) -> None:
    """The same rows with the same values: exact, except float model outputs within FLOAT_TOLERANCE (the model
    runs on batches, and which clips share a batch depends on the shards' contents)."""
    for table in SORT:
        assert len(got[table]) == len(want[table]), table
        for mine, theirs in zip(got[table], want[table], strict=True):
            assert mine.keys() == theirs.keys()
            for key, value in mine.items():
                other = theirs[key]
                if isinstance(value, float) or (
                    isinstance(value, list) and value and isinstance(value[0], float)
                ):
                    assert np.allclose(value, other, rtol=0, atol=FLOAT_TOLERANCE), (table, mine["uri"], key)
                else:
                    assert value == other, (table, mine["uri"], key)


def _files(output: Path) -> dict[str, int]:
    return {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}


def _decoded_in(output: Path, generation: int) -> int:
    """Videos decoded by the attempts that brought shards to ``generation`` (from their commit stats)."""
    view = Ledger(*storage.filesystem(str(output))).view()
    stats = [st.stats for st in view.shards.values() if st.stats and st.stats.get("generation") == generation]
    return sum(int(s["decode_tasks"]) for s in stats)


def test_update_indexes_only_what_changed_and_equals_a_fresh_index(tiny_model_dir, tmp_path, capsys):
    folder, output, fresh = tmp_path / "in", tmp_path / "out", tmp_path / "fresh"
    _collection(folder)
    assert run_job(_config(folder, output, tiny_model_dir)).exit_code == 1  # e.mp4 is not a video
    _change(folder)
    e_row = next(r for r in _rows(output)["videos"] if r["uri"].endswith("e.mp4"))

    code = main(["run", str(folder), str(output), "--model", str(tiny_model_dir), "--shard-size", "2",
                 "--clip-stride", "2", "--batch-size", "4", "--executor", "local", "--no-progress", "--update",
                 "--config", cli_job_yaml(tmp_path / "job.yaml")])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "generation 1: 2 new, 1 changed, 1 deleted, 3 unchanged" in printed
    assert _decoded_in(output, 1) == 3  # b, f and g: the unchanged a, c and e were not opened

    assert run_job(_config(folder, fresh, tiny_model_dir)).exit_code == 1
    updated, expected = _rows(output), _rows(fresh)
    assert [r["uri"].rsplit("/", 1)[1] for r in updated["videos"]] == ["a.mp4", "b.mp4", "c.mp4", "e.mp4",
                                                                       "f.mp4", "g.mp4"]  # fmt: skip
    _assert_same_rows(updated, expected)
    assert next(r for r in updated["videos"] if r["uri"].endswith("e.mp4")) == e_row
    assert next(r for r in updated["videos"] if r["uri"].endswith("b.mp4"))["frames"] == 36

    record = read_job(*storage.filesystem(str(output)))
    assert record["plan"]["generation"] == 1 and record["plan"]["videos"] == 6
    assert [g["generation"] for g in record["generations"]] == [0, 1]
    assert {k: record["generations"][1][k] for k in ("new", "changed", "deleted")} == {
        "new": 2, "changed": 1, "deleted": 1}  # fmt: skip
    status = job_status(str(output))
    assert status["generation"] == 1 and status["last_update"] == record["generations"][1]["at"]
    assert status["shards"]["committed"] == status["shards"]["total"] == 4
    assert main(["query", str(output), "summary", "--format", "json"]) == 0
    summary = capsys.readouterr().out
    assert '"generation": 1' in summary and record["generations"][1]["at"] in summary
    assert '"videos": 6' in summary
    assert main(["report", str(output), "--out", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "index generation" in html and record["generations"][1]["at"] in html
    capsys.readouterr()

    before = _files(output)  # nothing changed: nothing written, and it says so
    code = main(["run", str(folder), str(output), "--model", str(tiny_model_dir), "--shard-size", "2",
                 "--clip-stride", "2", "--batch-size", "4", "--executor", "local", "--no-progress", "--update",
                 "--config", cli_job_yaml(tmp_path / "job.yaml")])  # fmt: skip
    assert "nothing changed since generation 1: nothing written" in capsys.readouterr().out
    assert code == 1  # the index still holds e.mp4's error
    assert _files(output) == before


def test_a_video_deleted_then_back_and_a_shard_emptied(tiny_model_dir, tmp_path):
    folder, output, fresh = tmp_path / "in", tmp_path / "out", tmp_path / "fresh"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        _video(folder / f"{name}.mp4", 20, mtime=1_700_000_000)
    assert run_job(_config(folder, output, tiny_model_dir)).exit_code == 0
    moved = tmp_path / "c.mp4"
    shutil.move(folder / "c.mp4", moved)
    (folder / "d.mp4").unlink()  # shard 1 (c, d) now holds no video
    result = run_job(_config(folder, output, tiny_model_dir, **{"input.update": True}))
    assert result.summary["update"] == {"new": 0, "changed": 0, "deleted": 2, "unchanged": 2}
    assert [Path(r["uri"]).name for r in _rows(output)["videos"]] == ["a.mp4", "b.mp4"]
    assert job_status(str(output))["videos_planned"] == 2
    shutil.move(moved, folder / "c.mp4")  # back, as it was
    result = run_job(_config(folder, output, tiny_model_dir, **{"input.update": True}))
    assert result.summary["update"] == {"new": 1, "changed": 0, "deleted": 0, "unchanged": 2}
    assert run_job(_config(folder, fresh, tiny_model_dir)).exit_code == 0
    _assert_same_rows(_rows(output), _rows(fresh))


def test_update_guard_rails_write_nothing(tiny_model_dir, tmp_path):
    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b", "c"):
        _video(folder / f"{name}.mp4", 20)
    assert run_job(_config(folder, output, tiny_model_dir)).exit_code == 0
    before = _files(output)

    update = {"input.update": True}
    with pytest.raises(JobMismatchError, match="input: existing"):  # another input (a typo): refused first
        run_job(_config(tmp_path / "typo", output, tiny_model_dir, **update))
    folder.rename(tmp_path / "away")  # the input cannot be listed (unmounted, deleted bucket)
    with pytest.raises(PlanError, match="does not exist"):
        run_job(_config(folder, output, tiny_model_dir, **update))
    (tmp_path / "away").rename(folder)
    for video in folder.iterdir():
        video.rename(tmp_path / video.name)
    with pytest.raises(UpdateError, match="lists no videos now; an update would delete all 3 videos"):
        run_job(_config(folder, output, tiny_model_dir, **update))
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.mp4").rename(folder / f"{name}.mp4")
    (folder / "a.mp4").unlink()
    (folder / "b.mp4").unlink()
    with pytest.raises(UpdateError, match=r"delete 2 of the index's 3 videos.*--allow-mass-delete"):
        run_job(_config(folder, output, tiny_model_dir, **{"input.update": True}))
    with pytest.raises(JobMismatchError, match="sampling.*clip_stride"):
        run_job(_config(folder, output, tiny_model_dir, **{"input.update": True, "sampling.clip_stride": 3}))
    assert _files(output) == before

    result = run_job(_config(folder, output, tiny_model_dir, **{"input.update": True,
                                                                "input.allow_mass_delete": True}))  # fmt: skip
    assert result.summary["update"]["deleted"] == 2
    assert [Path(r["uri"]).name for r in _rows(output)["videos"]] == ["c.mp4"]


def test_update_killed_at_either_point_is_finished_by_resume(tiny_model_dir, tmp_path):
    """An update killed after writing its plan but before _job.json named it, then one killed (SIGKILL) once
    its first shard is committed: `status` says the job must be resumed, `resume` finishes each update, and
    each time the index equals a fresh index of the changed collection. The tests' decoder plug-in makes the
    killed update's videos decode in >= 1 s each (VIDEO.slow), so the kill lands between its shards."""
    from videoindex.config import InputConfig
    from videoindex.format.layout import plan_file
    from videoindex.format.plans import read_plan, write_plan
    from videoindex.job.update import diff_plan, listing_table
    from videoindex.stages.plan import list_inputs

    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(8):
        _video(folder / f"v{i}.mp4", 20 + 2 * i, mtime=1_700_000_000)
    slowed = {"decode.decoder": SLOWED}  # every run of this output, and the fresh indexes to compare with
    assert run_job(_config(folder, output, tiny_model_dir, **slowed)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    resume = ["resume", str(output), "--no-progress"]  # the CLI in this process: no interpreter to start

    _video(folder / "v1.mp4", 31, mtime=1_800_000_000)  # 1. killed before the plan was named
    (folder / "v3.mp4").unlink()
    _video(folder / "v8.mp4", 18)
    fs, root = storage.filesystem(str(output))
    listed = listing_table(list_inputs(InputConfig(uri=str(folder))))
    write_plan(fs, root, diff_plan(read_plan(fs, root), listed, 2, 1).plan, 2, plan_file(1))
    assert main(resume) == 0
    record = read_job(fs, root)
    assert [(g["generation"], g.get("new"), g.get("changed"), g.get("deleted")) for g in record["generations"]] == [
        (0, None, None, None), (1, 1, 1, 1)]  # fmt: skip
    assert run_job(_config(folder, tmp_path / "fresh1", tiny_model_dir, **slowed)).exit_code == 0
    _assert_same_rows(_rows(output), _rows(tmp_path / "fresh1"))

    for i in (0, 2, 4, 6):  # 2. killed mid-way: a change in every shard, and a new video
        _video(folder / f"v{i}.mp4", 30 + i, mtime=1_900_000_000)
    _video(folder / "v9.mp4", 18)
    slow = [folder / f"v{i}.mp4.slow" for i in (0, 2, 4, 6, 9)]
    for marker in slow:
        marker.write_text("1.0")
    cmd = [sys.executable, "-m", "videoindex.cli", "run", str(folder), str(output), "--update", "--model",
           str(tiny_model_dir), "--shard-size", "2", "--clip-stride", "2", "--batch-size", "4",
           "--executor", "local", "--no-progress", "--config", str(tmp_path / "beat.yaml")]  # fmt: skip
    cli_job_yaml(tmp_path / "beat.yaml", "heartbeat_s: 0.5", decode=f"decoder: '{SLOWED}'")  # dead in 1.5 s
    driver = subprocess.Popen(cmd, cwd=REPO, env=env)
    ledger = Ledger(fs, root)

    def update_commits() -> set[int]:
        return {s for s, st in ledger.view().shards.items() if (st.stats or {}).get("generation") == 2}

    wait_for(lambda: len(update_commits()) >= 1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    for marker in slow:
        marker.unlink()
    done = update_commits()
    assert 1 <= len(done) < 5, done  # the update's 5 shards: 0-3 (one change each) and 5 (v9, new)
    wait_for(lambda: job_status(str(output))["job"]["state"] == "not running", timeout=30)
    status = job_status(str(output))
    shards = status["shards"]
    assert shards["total"] - shards["committed"] == 5 - len(done)
    # Waiting for the update: the changed shards still committed at generation 1, not the new shard 5.
    assert shards["pending_update"] == 4 - len(done - {5})
    assert status["job"]["continue_with"] == f"videoindex resume {output}"
    assert main(resume) == 0
    assert run_job(_config(folder, tmp_path / "fresh2", tiny_model_dir, **slowed)).exit_code == 0
    _assert_same_rows(_rows(output), _rows(tmp_path / "fresh2"))
    assert [g["generation"] for g in read_job(fs, root)["generations"]] == [0, 1, 2]
    status = job_status(str(output))
    assert (
        status["shards"]["committed"] == status["shards"]["total"] and not status["shards"]["pending_update"]
    )


# Per video: its videos row and its clip rows, in one query (one reading of the ledger).
VIDEO_AND_CLIPS = ("SELECT v.uri, any_value(v.frames) AS frames, any_value(v.num_clips) AS num_clips, "
                   "count(DISTINCT v.shard) AS video_rows_shards, count(c.clip_index) AS clip_rows, "
                   "count(DISTINCT c.clip_index) AS distinct_clips "
                   "FROM videos v LEFT JOIN clips c USING (video_id) GROUP BY v.uri, v.video_id ORDER BY v.uri")  # fmt: skip


def test_readers_during_an_update_see_each_shard_before_or_after_it(tiny_model_dir, tmp_path):
    """An update writes each rewritten shard's files as a new version beside the committed ones and
    commits it: readers querying all through it get every video's clip rows from the same version as its
    videos row (every video changes its length, so old clips with a new videos row would show), each video
    once; a reader opened before the update answers after it from the new files, though the ones it had
    planned to read are gone; and no superseded file is left."""
    from tests.helpers import table_hashes

    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(6):
        _video(folder / f"v{i}.mp4", 20 + 2 * i, mtime=1_700_000_000)
    assert run_job(_config(folder, output, tiny_model_dir)).exit_code == 0
    before = open_index(str(output)).sql(VIDEO_AND_CLIPS).to_pylist()
    early = open_index(str(output))
    for i in range(6):
        _video(folder / f"v{i}.mp4", 30 + 2 * i, mtime=1_800_000_000)

    answers, failures, stop = [], [], threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                with open_index(str(output)) as index:
                    answers.append(index.sql(VIDEO_AND_CLIPS).to_pylist())
        except Exception as exc:  # a reader must never fail: it reads again after each rewrite it meets
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert run_job(_config(folder, output, tiny_model_dir, **{"input.update": True})).exit_code == 0
    finally:
        stop.set()
        reader.join()
    assert not failures, failures
    after = early.sql(VIDEO_AND_CLIPS).to_pylist()
    assert [r["frames"] for r in before] == [20, 22, 24, 26, 28, 30]
    assert [r["frames"] for r in after] == [30, 32, 34, 36, 38, 40]
    assert len(answers) >= 3
    for rows in answers + [before, after]:
        assert len(rows) == 6 and all(r["video_rows_shards"] == 1 for r in rows)
        for row in rows:
            assert row["clip_rows"] == row["distinct_clips"] == row["num_clips"] > 0, row
            assert row in before or row in after, row
    assert len(table_hashes(output)) == 3 * 3  # one file per table and shard: superseded versions deleted


def test_diff_compares_size_mtime_etag_and_manifest_columns():
    """The diff alone (no video): a new ETag with the same size and time is a change; new URIs go into new
    shards after the existing ones; deleted rows stay in the plan, flagged, with the generation."""
    from videoindex.format.plans import ShardRows, live, shard_tasks
    from videoindex.job.update import diff_plan, listing_table
    from videoindex.stages.plan import make_plan

    def row(name: str, etag: str = "e1", size: int = 10, extra: str | None = None) -> dict:
        return {"uri": f"s3://b/{name}", "size_bytes": size, "mtime": "2026-01-01T00:00:00+00:00", "extra": extra,
                "etag": etag}  # fmt: skip

    plan = make_plan([row("a"), row("b"), row("c"), row("d"), row("e")], 2)
    listed = listing_table([row("e", extra='{"camera": "rear"}'), row("a"), row("b", etag="e2"), row("d"),
                            row("z"), row("y"), row("y", etag="dup")])  # fmt: skip
    diff = diff_plan(plan, listed, 2, 1)
    assert diff.counts() == {"new": 2, "changed": 2, "deleted": 1, "unchanged": 2}
    rows = diff.plan.to_pylist()
    assert [(r["uri"][7:], r["shard"], r["generation"], r["deleted"]) for r in rows] == [
        ("a", 0, 0, False), ("b", 0, 1, False), ("c", 1, 1, True), ("d", 1, 0, False), ("e", 2, 1, False),
        ("y", 3, 1, False), ("z", 3, 1, False)]  # fmt: skip
    assert rows[1]["etag"] == "e2" and rows[4]["extra"] == '{"camera": "rear"}' and rows[5]["etag"] == "e1"
    assert [t.uri[7:] for t in shard_tasks(ShardRows(live(diff.plan))(1))] == ["d"]
    assert live(diff.plan).num_rows == 6
    again = diff_plan(diff.plan, listed, 2, 2)
    assert again.empty and again.counts()["unchanged"] == 6
    unrecorded = make_plan([{**row("a"), "etag": None}], 2)  # planned before ETags were recorded
    upgraded = diff_plan(unrecorded, listing_table([row("a")]), 2, 1)
    assert upgraded.empty and upgraded.plan["etag"].to_pylist() == ["e1"]


def test_update_on_s3_compares_etags(s3, tiny_model_dir, tmp_path):
    """On the moto S3 server: a replaced object (new ETag and last-modified) is indexed again, a deleted one
    leaves the tables, a new one is added; the result equals a fresh index of the bucket."""
    fs = s3.fs()
    fs.mkdir("videos-in")
    for name, frames in (("a", 20), ("b", 24), ("c", 28)):
        fs.put_file(str(_video(tmp_path / f"{name}.mp4", frames)), f"videos-in/{name}.mp4")
    options = {"input.storage_options": s3.options(), "output.storage_options": s3.options()}
    config = _config("s3://videos-in", "s3://index-out/index", tiny_model_dir, **options)
    fs.mkdir("index-out")
    assert run_job(config).exit_code == 0
    etags = {Path(p).name: fs.info(p)["ETag"] for p in fs.find("videos-in")}
    fs.put_file(str(_video(tmp_path / "b2.mp4", 30)), "videos-in/b.mp4")
    fs.rm_file("videos-in/c.mp4")
    fs.put_file(str(_video(tmp_path / "d.mp4", 16)), "videos-in/d.mp4")
    fs.invalidate_cache()
    assert fs.info("videos-in/b.mp4")["ETag"] != etags["b.mp4"]
    result = run_job(
        _config("s3://videos-in", "s3://index-out/index", tiny_model_dir, **options, **{"input.update": True})
    )
    assert result.summary["update"] == {"new": 1, "changed": 1, "deleted": 1, "unchanged": 1}
    assert (
        run_job(_config("s3://videos-in", "s3://index-out/fresh", tiny_model_dir, **options)).exit_code == 0
    )
    local = tmp_path / "copies"
    for name in ("index", "fresh"):
        fs.get(f"index-out/{name}", str(local / name), recursive=True)
    _assert_same_rows(_rows(local / "index"), _rows(local / "fresh"))
    plan = ds.dataset(str(local / "index" / "_plan" / "plan-00001.parquet")).to_table().to_pylist()
    assert {Path(r["uri"]).name: r["etag"] for r in plan if not r["deleted"]}["a.mp4"] == etags[
        "a.mp4"
    ].strip('"')
