"""The command line as a user runs it: exit codes, summary, status, clear one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import cli_job_yaml
from videoindex.cli import main


def _job_yaml(tmp_path):
    return cli_job_yaml(
        tmp_path / "job.yaml", "actor_num_cpus: 0.5, decode_num_cpus: 0.5", "output: {shard_size: 1}\n"
    )


@pytest.mark.ray
def test_run_then_status(ray_session, tiny_model_dir, sample_videos, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(sample_videos), str(out), "--model", str(tiny_model_dir), "--config", _job_yaml(tmp_path),
                 "--batch-size", "3", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "videos_ok         2" in printed and f"{out}/clips" in printed
    assert main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == {
        "total": 2,
        "committed": 2,
        "running": 0,
        "stalled": 0,
        "failed": 0,
        "pending": 0,
        "pending_update": 0,
    }
    assert report["job"]["state"] == "finished" and "continue_with" not in report["job"]
    assert report["videos_ok"] == 2 and report["clips"] > 0
    assert main(["status", str(out)]) == 0
    assert "2/2 committed" in capsys.readouterr().out


def test_some_videos_failed_exit_code(tiny_model_dir, sample_videos, tmp_path, capsys):
    (sample_videos / "broken.mp4").write_bytes(b"\x00" * 100)
    code = main(["run", str(sample_videos), str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 "--config", _job_yaml(tmp_path), "--executor", "local", "--no-progress"])  # fmt: skip
    assert code == 1
    assert "videos_error      1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "{in}", "{out}", "--clip-stride", "0"], "sampling.clip_stride must be >= 1"),
        (["run", "{tmp}/nowhere", "{out}", "--random-weights"], "does not exist"),
        (["run", "{in}", "{out}"], "--model"),  # offline, no weights: say how to pass a checkpoint
        (["status", "{tmp}"], "not a videoindex output"),
        (["resume", "{tmp}"], "not a videoindex output"),
        (["status", "raysubmit_abc123"], "neither an output directory/URI nor"),
        (["run", "{in}", "{in}/demo.mp4/out", "--random-weights"], "NotADirectoryError"),  # an OSError
    ],
)
def test_bad_input_one_clear_line(sample_videos, tmp_path, capsys, argv, message):
    argv = [a.format(**{"in": sample_videos, "out": tmp_path / "out", "tmp": tmp_path}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith(f"videoindex {argv[0]}: ") for line in err)
    assert message in "\n".join(err)
    assert "Traceback" not in "\n".join(err)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--random-weights", "--sampling", "--clip-stride", "--max-clips-per-video", "--shard-size",
                 "--actors", "--batch-size", "--decoder", "--config", "examples:"):  # fmt: skip
        assert flag in text


def test_demo_says_loudly_it_uses_random_weights_and_records_it(tmp_path, capsys):
    """Offline (no model hub), the demo cannot load the trained weights: a banner says so, and _job.json and
    every row record the random weights."""
    import pyarrow.dataset as ds

    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--executor", "local", "--max-clips-per-video", "1"]) == 0
    printed = capsys.readouterr()
    assert "!! The demo runs with RANDOM WEIGHTS of the real architecture" in printed.err
    assert "RANDOM WEIGHTS: labels and scores are meaningless" in printed.out
    job = json.loads((out / "_job.json").read_text())
    assert job["model"]["random_weights"] is True and "RANDOM WEIGHTS" in job["model"]["warning"]
    for table in ("clips", "videos"):
        models = set(
            ds.dataset(out / table, partitioning="hive").to_table(columns=["model"])["model"].to_pylist()
        )
        assert models == {"MCG-NJU/videomae-small-finetuned-ssv2 [RANDOM WEIGHTS seed=0]"}, table


def test_rerun_flag_reindexes_committed_shards_into_the_same_bytes(
    tiny_model_dir, sample_videos, tmp_path, capsys
):
    from tests.helpers import table_hashes

    out = tmp_path / "out"
    argv = ["run", str(sample_videos), str(out), "--model", str(tiny_model_dir), "--executor", "local",
            "--shard-size", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    first, markers = table_hashes(out), sorted((out / "_ledger").rglob("*started*"))
    assert main(argv) == 0  # the same job again: committed shards are skipped
    assert sorted((out / "_ledger").rglob("*started*")) == markers
    assert main([*argv, "--rerun"]) == 0  # every shard again, its files overwritten with the same bytes
    assert len(sorted((out / "_ledger").rglob("*started*"))) == 2 * len(markers)
    assert table_hashes(out) == first


@pytest.mark.parametrize("code", [0, 1, 2])
def test_console_main_after_ray_exits_with_mains_code_and_all_output(tmp_path, code):
    """After a job on Ray the command shuts Ray down and ends with os._exit: main's exit code and every
    buffered line (stdout is a pipe, so block-buffered: PYTHONUNBUFFERED removed) must survive. A stand-in
    ``ray`` module (it only says it is initialized) keeps this a test of the exit, not of Ray; the real Ray
    path is test_faults' CLI resume."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text(
        textwrap.dedent(f"""
        def is_initialized():
            return True
        def shutdown():
            open({str(tmp_path / "shutdown")!r}, "w").close()
    """)
    )
    script = textwrap.dedent(f"""
        import logging, sys
        import ray
        import videoindex.cli as cli
        def main():
            for i in range(20000):
                print(f"line {{i}}")
            logging.getLogger("videoindex").warning("last words")
            return {code}
        cli.main = main
        cli.console_main()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stdout.splitlines() == [f"line {i}" for i in range(20000)]
    assert "last words" in done.stderr
    assert (tmp_path / "shutdown").exists()
