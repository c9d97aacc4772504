"""End to end with the local executor: real videos in, real Parquet out, read back by three engines.

The Ray executor's own behaviour (and that it writes the same bytes) is in test_ray_executor.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.helpers import small_job_config, table_hashes, videos_by_name
from videoindex.config import load_config
from videoindex.format.jobrecord import JobMismatchError
from videoindex.format.schemas import VIDEOS_SCHEMA, clips_schema
from videoindex.job.run import EXIT_VIDEOS_FAILED, run_job
from videoindex.stages.sampling import plan_clips
from videoindex.status import job_status


@pytest.fixture()
def messy_input(sample_videos: Path) -> Path:
    """Two real videos, an empty file, a text file named .mp4, random bytes."""
    folder = sample_videos
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is not a video\n" * 50)
    (folder / "noise.mkv").write_bytes(bytes(range(256)) * 64)
    return folder


def test_index_folder_end_to_end(tiny_model_dir, messy_input, tmp_path):
    output = tmp_path / "out"
    config = small_job_config(str(messy_input), output, tiny_model_dir)
    result = run_job(config)
    assert result.exit_code == EXIT_VIDEOS_FAILED  # some videos failed, the job finished
    assert result.summary["shards_committed"] == 3

    by_name = videos_by_name(output)
    assert sorted(by_name) == ["carphone_pristine.mp4", "demo.mp4", "empty.mp4", "noise.mkv", "notes.mp4"]
    assert by_name["empty.mp4"]["error_type"] == "empty_file"
    assert by_name["notes.mp4"]["error_type"] == "not_a_video"
    assert by_name["noise.mkv"]["error_type"] == "not_a_video"
    for bad in ("empty.mp4", "notes.mp4", "noise.mkv"):
        assert by_name[bad]["status"] == "error" and by_name[bad]["error_message"]
        assert by_name[bad]["num_clips"] == 0

    clips = ds.dataset(output / "clips", partitioning="hive").to_table()
    for name, frames in (("demo.mp4", 280), ("carphone_pristine.mp4", 120)):
        video = by_name[name]
        assert video["status"] == "ok" and video["frames"] == frames and video["decoder"] == "pyav"
        expected = plan_clips(frames, config.sampling, 16)
        rows = [c for c in clips.to_pylist() if c["video_id"] == video["video_id"]]
        assert video["num_clips"] == len(rows) == len(expected)
        assert [r["frame_indices"] for r in rows] == [list(c.frame_indices) for c in expected]
        for row in rows:
            assert row["start_s"] == pytest.approx(row["frame_indices"][0] / video["fps"], abs=1e-3)
            assert row["topk_labels"][0] == row["label"] and row["topk_scores"][0] == pytest.approx(
                row["score"]
            )
            assert len(row["logits"]) == 7 and len(row["embedding"]) == 32
            # end_frame: the last sampled frame; end_s: the end of that frame (its time + one frame)
            assert (
                row["end_frame"] == row["frame_indices"][-1] and row["start_frame"] == row["frame_indices"][0]
            )
            assert row["end_s"] == pytest.approx((row["end_frame"] + 1) / video["fps"], abs=1e-3)
        # the video's label: the argmax of the mean of its clips' softmax probabilities
        logits = np.array([r["logits"] for r in rows], np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        mean = (probs / probs.sum(1, keepdims=True)).mean(0)
        assert video["label_id"] == int(mean.argmax()) and video["label"] == f"label_{mean.argmax()}"
        assert video["score"] == pytest.approx(mean.max(), rel=1e-5)


def test_schema_metadata_and_three_readers(tiny_model_dir, sample_videos, tmp_path):
    output = tmp_path / "out"
    config = small_job_config(
        str(sample_videos), output, tiny_model_dir, **{"output.clips_row_group_size": 3}
    )
    assert run_job(config).exit_code == 0
    for path in [p for t in ("clips", "videos", "errors") for p in (output / t).rglob("*.parquet")]:
        meta = pq.read_schema(path).metadata  # every table file says how to read it, without _job.json
        assert meta[b"videoindex.schema_version"] == b"1", path
        assert json.loads(meta[b"videoindex.label_map"]) == {str(i): f"label_{i}" for i in range(7)}, path
    clip_file = next((output / "clips").rglob("*.parquet"))
    parquet = pq.ParquetFile(clip_file)  # row groups of clips_row_group_size, with min/max statistics
    assert parquet.metadata.num_rows == 7 and [parquet.metadata.row_group(g).num_rows for g in range(3)] == [
        3,
        3,
        1,
    ]
    score = parquet.schema_arrow.get_field_index("score")
    for g in range(3):
        stats = parquet.metadata.row_group(g).column(score).statistics
        values = parquet.read_row_group(g, columns=["score"])["score"].to_pylist()
        assert stats.has_min_max and (stats.min, stats.max) == (min(values), max(values))
    schema = pq.read_schema(clip_file)
    assert schema.remove_metadata().equals(clips_schema(7, 32))
    meta = schema.metadata
    assert json.loads(meta[b"videoindex.label_map"])["3"] == "label_3"
    assert meta[b"videoindex.model"].decode() == str(tiny_model_dir)
    assert (
        pq.read_schema(next((output / "videos").rglob("*.parquet"))).remove_metadata().equals(VIDEOS_SCHEMA)
    )

    arrow = ds.dataset(output / "clips", partitioning="hive").to_table()
    assert arrow.schema.field("shard").type.bit_width >= 32
    duck = duckdb.sql(
        f"select count(*), count(distinct video_id) from read_parquet('{output}/clips/*/*.parquet', hive_partitioning=true)"
    ).fetchall()[0]
    polars = (
        pl.scan_parquet(f"{output}/clips/**/*.parquet", hive_partitioning=True)
        .select(pl.len())
        .collect()
        .item()
    )
    assert duck == (arrow.num_rows, 2) and polars == arrow.num_rows

    job = json.loads((output / "_job.json").read_text())
    assert job["model"]["random_weights"] is False and job["model"]["weights_sha256"]
    assert job["model"]["id2label"]["0"] == "label_0"
    assert job["config"]["sampling"]["strategy"] == "sliding"
    status = job_status(str(output))
    assert status["shards"]["committed"] == status["shards"]["total"] == 1
    assert status["clips"] == arrow.num_rows
    (stats_file,) = (output / "_ledger" / "log").glob("*.committed.json")
    stats = json.loads(stats_file.read_text())
    assert stats["decode_tasks"] == 2  # one decode per video, whatever its number of chunks
    assert 0 <= stats["decode_cold_starts"] <= stats["decode_tasks"]


def test_rerun_is_byte_identical_and_other_settings_refused(tiny_model_dir, sample_videos, tmp_path):
    output = tmp_path / "out"
    run_job(small_job_config(str(sample_videos), output, tiny_model_dir))
    first = table_hashes(output)
    assert len(first) == 3
    again = run_job(
        small_job_config(str(sample_videos), output, tiny_model_dir, **{"execution.actors": 2}), rerun=True
    )
    assert again.summary["shards_to_run"] == 1
    assert table_hashes(output) == first

    other = tmp_path / "other"
    run_job(small_job_config(str(sample_videos), other, tiny_model_dir))
    assert table_hashes(other) == first  # same input, same settings, another output: same bytes

    with pytest.raises(JobMismatchError, match="sampling"):
        run_job(small_job_config(str(sample_videos), output, tiny_model_dir, **{"sampling.clip_stride": 2}))


def test_missing_file_in_manifest_is_a_row(tiny_model_dir, sample_videos, tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{sample_videos}/demo.mp4\n{sample_videos}/gone.mp4\n")
    output = tmp_path / "out"
    result = run_job(small_job_config(str(manifest), output, tiny_model_dir))
    assert result.exit_code == EXIT_VIDEOS_FAILED
    videos = videos_by_name(output)
    assert videos["gone.mp4"]["error_type"] == "not_found"
    assert "gone.mp4" in videos["gone.mp4"]["error_message"]
    assert videos["demo.mp4"]["status"] == "ok"


def test_tables_match_plain_transformers_path(sample_videos, tmp_path):
    """Clips written by a full job (full-size architecture, seeded random weights) agree with the
    model-card path on the same frames: PIL image processor with the checkpoint's mean/std + model."""
    import decord
    import numpy as np
    import torch
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

    from videoindex.config import ModelConfig, PreprocessConfig
    from videoindex.stages.checkpoint import resolve_model
    from videoindex.stages.model import VideoClassifier

    output = tmp_path / "out"
    config = load_config(
        None,
        {"input.uri": str(sample_videos), "output.uri": str(output), "model.random_weights": True,
         "sampling.max_clips_per_video": 3, "execution.batch_size": 3, "execution.progress": False,
         "execution.executor": "local", "execution.torch_threads": 2},
    )  # fmt: skip
    assert run_job(config).exit_code == 0
    clips = ds.dataset(output / "clips", partitioning="hive").to_table().to_pylist()
    assert len(clips) == 2 + 3 and all(
        "RANDOM WEIGHTS" in c["model"] for c in clips
    )  # carphone: 120 frames, 2 clips

    cfg = ModelConfig(random_weights=True)
    model = VideoClassifier(resolve_model(cfg, PreprocessConfig()), cfg).model
    spec_mean, spec_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = VideoMAEImageProcessorPil(image_mean=spec_mean, image_std=spec_std)
    cosines, agree = [], []
    for clip in clips:
        reader = decord.VideoReader(clip["uri"].removeprefix("file://"))
        frames = reader.get_batch(clip["frame_indices"]).asnumpy()
        del reader
        pixel_values = processor(list(frames), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            seq = model.videomae(pixel_values).last_hidden_state
            emb = model.fc_norm(seq.mean(1))
            logits = model.classifier(emb)
        ours = torch.tensor(clip["embedding"])[None]
        cosines.append(float(torch.nn.functional.cosine_similarity(ours, emb)[0]))
        agree.append(int(logits.argmax(1)[0]) == clip["label_id"])
        np.testing.assert_allclose(clip["logits"], logits[0].numpy(), atol=0.05)
    print(f"\nmin cosine {min(cosines):.6f}, top-1 agreement {np.mean(agree):.0%} over {len(clips)} clips")
    assert min(cosines) >= 0.999
    assert np.mean(agree) >= 0.95


def test_failing_shard_gets_max_attempts_in_every_run(tiny_model_dir, sample_videos, tmp_path):
    """A crash between writing the plan and _job.json leaves a lone _plan/: a new run takes the output.
    A rewrite of a committed shard that keeps failing gets execution.max_attempts tries per run while the
    old commit stays in force (its files untouched: readers keep the old rows), then commits once repaired."""
    from videoindex import storage
    from videoindex.format.ledger import Ledger

    output = tmp_path / "out"
    (output / "_plan").mkdir(parents=True)
    (output / "_plan" / "plan.parquet").write_bytes(b"half a plan from a killed driver")
    config = small_job_config(str(sample_videos), output, tiny_model_dir, **{"execution.max_attempts": 2})
    assert run_job(config).exit_code == 0
    clean = table_hashes(output)
    ledger = Ledger(*storage.filesystem(str(output)))
    partition = output / "clips" / "shard=00000"
    blocked = [partition / f"part-00000-v{attempt:04d}.parquet" for attempt in range(2, 6)]
    for path in blocked:
        path.mkdir()  # a folder where each attempt's new file goes: it can no longer be written
    for run in (1, 2):
        result = run_job(config, rerun=True)
        assert result.exit_code == 2 and 0 in result.summary["failed_shards"]
        state = ledger.view().state(0)
        assert (state.status, state.version, state.failed_attempts) == ("committed", 0, 2 * run)  # two tries
        assert "shard=00000" in state.last_failure
    for path in blocked:
        path.rmdir()
    assert table_hashes(output) == clean  # the committed files, untouched
    assert run_job(config, rerun=True).exit_code == 0
    assert ledger.view().state(0).version == 6
    assert table_hashes(output) == clean
    assert not list(output.rglob(".*.tmp-*"))


def test_retry_failed_retries_only_retryable_errors_unless_all(tiny_model_dir, sample_videos, tmp_path):
    """A crashed decode (retryable) and an empty file (not retryable, the file's fault) are both repaired:
    --retry-failed re-indexes the crashed video only; --retry-failed --all the empty file too."""
    from tests.conftest import SAMPLES

    (sample_videos / "carphone_pristine.mp4.crash").write_text("")  # the faulty decoder kills its worker
    (sample_videos / "empty.mp4").write_bytes(b"")
    config = small_job_config(sample_videos, tmp_path / "out", tiny_model_dir,
                              **{"decode.decoder": "tests.faulty_decoder:open_faulty", "output.shard_size": 3})  # fmt: skip
    assert run_job(config).exit_code == EXIT_VIDEOS_FAILED
    status = {name: v["error_type"] for name, v in videos_by_name(tmp_path / "out").items()}
    assert status == {"carphone_pristine.mp4": "decoder_crash", "demo.mp4": None, "empty.mp4": "empty_file"}
    (sample_videos / "carphone_pristine.mp4.crash").unlink()
    shutil.copy(SAMPLES / "demo.mp4", sample_videos / "empty.mp4")  # both files are fine now

    run_job(config, resume=True, retry_failed=True)
    status = {name: v["error_type"] for name, v in videos_by_name(tmp_path / "out").items()}
    assert status == {"carphone_pristine.mp4": None, "demo.mp4": None, "empty.mp4": "empty_file"}
    assert run_job(config, resume=True, retry_failed=True, retry_all_errors=True).exit_code == 0
    assert all(v["status"] == "ok" for v in videos_by_name(tmp_path / "out").values())
