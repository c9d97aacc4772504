"""The command line as a user runs it: exit codes, summary, status, clear one-line errors."""

from __future__ import annotations

import json

import pytest

from videoindex.cli import main


def _job_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("execution: {actor_num_cpus: 0.5, decode_num_cpus: 0.5}\noutput: {shard_size: 1}\n")
    return str(path)


def test_run_then_status(ray_session, tiny_model_dir, sample_videos, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(sample_videos), str(out), "--model", str(tiny_model_dir), "--config", _job_yaml(tmp_path),
                 "--batch-size", "3", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "videos_ok         2" in printed and f"{out}/clips" in printed
    assert main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == {"total": 2, "committed": 2, "running": 0, "failed": 0, "pending": 0}
    assert report["videos_ok"] == 2 and report["clips"] > 0
    assert main(["status", str(out)]) == 0
    assert "2/2 committed" in capsys.readouterr().out


def test_some_videos_failed_exit_code(ray_session, tiny_model_dir, sample_videos, tmp_path, capsys):
    (sample_videos / "broken.mp4").write_bytes(b"\x00" * 100)
    code = main(["run", str(sample_videos), str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 "--config", _job_yaml(tmp_path), "--no-progress"])  # fmt: skip
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
