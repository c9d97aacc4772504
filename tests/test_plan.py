from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from videoindex.config import InputConfig
from videoindex.stages.plan import PlanError, list_inputs, make_plan, video_id


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_directory_listing_is_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ("b.mp4", "A.MOV", "sub/c.mkv", "notes.txt", "sub/deeper/d.WebM"):
        _touch(tmp_path / name)
    rows = list_inputs(InputConfig(uri=str(tmp_path)))
    plan = make_plan(rows, shard_size=2)
    names = [u.rsplit("/", 1)[1] for u in plan["uri"].to_pylist()]
    assert names == ["A.MOV", "b.mp4", "c.mkv", "d.WebM"]
    assert plan["shard"].to_pylist() == [0, 0, 1, 1]
    assert all(u.startswith("file://") for u in plan["uri"].to_pylist())
    assert plan["size_bytes"].to_pylist() == [1, 1, 1, 1]


def test_ids_are_stable_and_plans_deterministic(tmp_path):
    for name in ("x.mp4", "y.mp4", "z.mp4"):
        _touch(tmp_path / name)
    one = make_plan(list_inputs(InputConfig(uri=str(tmp_path))), 2)
    two = make_plan(list(reversed(list_inputs(InputConfig(uri=str(tmp_path))))), 2)
    assert one.equals(two)
    assert one["video_id"][0].as_py() == video_id(one["uri"][0].as_py())
    assert len(set(one["video_id"].to_pylist())) == 3


def test_glob_and_manifests(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.avi"):
        _touch(tmp_path / "v" / name)
    assert len(list_inputs(InputConfig(uri=str(tmp_path / "v" / "*.mp4")))) == 2
    (tmp_path / "list.txt").write_text(
        "# comment\nv/a.mp4\n\n" + str(tmp_path / "v" / "c.avi") + "\nv/a.mp4\n"
    )
    rows = list_inputs(InputConfig(uri=str(tmp_path / "list.txt")))
    plan = make_plan(rows, 10)
    assert plan.num_rows == 2  # duplicate dropped, relative path resolved against the manifest
    csv = tmp_path / "list.csv"
    csv.write_text(f"uri,split\n{tmp_path}/v/a.mp4,train\n{tmp_path}/v/b.mp4,val\n")
    rows = list_inputs(InputConfig(uri=str(csv)))
    assert [r["extra"] for r in rows] == ['{"split": "train"}', '{"split": "val"}']
    pq.write_table(pa.table({"uri": [f"{tmp_path}/v/b.mp4"], "n": [3]}), tmp_path / "m.parquet")
    assert list_inputs(InputConfig(uri=str(tmp_path / "m.parquet")))[0]["extra"] == '{"n": 3}'


def test_bad_inputs_say_why(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        list_inputs(InputConfig(uri=str(tmp_path / "missing")))
    _touch(tmp_path / "readme.md")
    with pytest.raises(PlanError, match="neither a video"):
        list_inputs(InputConfig(uri=str(tmp_path / "readme.md")))
    (tmp_path / "bad.csv").write_text("path\n/a.mp4\n")
    with pytest.raises(PlanError, match="no 'uri' column"):
        list_inputs(InputConfig(uri=str(tmp_path / "bad.csv")))
