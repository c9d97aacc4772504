"""Every path of a job against a real S3 server (moto on 127.0.0.1): s3:// in, s3:// out, IAM enforced.

Jobs run on the shared local Ray; its workers reach moto through the endpoint URL and credentials in
storage_options. Pre-flight failures (missing bucket, no write permission, foreign tables) must come
before any Ray work.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
from pathlib import Path

import botocore.exceptions
import pyarrow.dataset as pads
import pytest
import s3fs

from tests import s3server
from tests.conftest import SAMPLES
from tests.helpers import small_job_config
from tests.s3server import TEST_KEY, TEST_SECRET, FlakyProxy, S3Server, s3_options
from videoindex import storage
from videoindex.config import load_config
from videoindex.format.jobrecord import JobMismatchError
from videoindex.job.run import EXIT_VIDEOS_FAILED, run_job
from videoindex.stages.plan import PlanError, list_inputs
from videoindex.status import job_status

s3_server, s3 = s3server.s3_server, s3server.s3  # the moto fixtures

IN, OUT = "videos-in", "index-out"
TEST_CREDS = (TEST_KEY, TEST_SECRET)
ALLOW_ALL = [{"Effect": "Allow", "Action": "*", "Resource": "*"}]
READ_INPUT = [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": ["*"]},
    {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{IN}/private/*"},
]


def _config(s3: S3Server, input_uri: str, output_uri: str, model_dir, *, reader=TEST_CREDS, writer=TEST_CREDS,
            **extra):  # fmt: skip
    return small_job_config(input_uri, output_uri, model_dir, **{
        "input.storage_options": s3.options(*reader), "output.storage_options": s3.options(*writer),
        "sampling.strategy": "uniform", "sampling.clips_per_video": 2, **extra})  # fmt: skip


def _upload_inputs(fs: s3fs.S3FileSystem) -> None:
    fs.mkdir(IN)
    fs.put_file(str(SAMPLES / "demo.mp4"), f"{IN}/clips/demo.mp4")
    fs.put_file(str(SAMPLES / "carphone_pristine.mp4"), f"{IN}/clips/carphone.mp4")
    fs.put_file(str(SAMPLES / "demo.mp4"), f"{IN}/private/secret.mp4")
    manifest = (
        "uri,camera\n"
        f"s3://{IN}/clips/demo.mp4,front\n"
        "carphone.mp4,rear\n"  # relative to the manifest
        f"s3://{IN}/clips/gone.mp4,side\n"
        f"s3://{IN}/private/secret.mp4,top\n"
    )
    fs.pipe_file(f"{IN}/clips/manifest.csv", manifest.encode())


def _videos(fs: s3fs.S3FileSystem, output: str) -> list[dict]:
    fs.invalidate_cache()
    dataset = pads.dataset(f"{output}/videos", filesystem=fs, partitioning="hive", format="parquet")
    return dataset.to_table().to_pylist()


@pytest.mark.ray
def test_s3_to_s3_job_resume_status_query_without_leaking_secrets(
    ray_session, tiny_model_dir, s3, caplog, capfd
):
    """On the Ray executor: model actors and decode workers in Ray worker processes, whose logs Ray keeps
    in its session directory; the secrets must be in none of them."""
    admin = s3.fs()
    _upload_inputs(admin)
    admin.mkdir(OUT)
    reader, writer = s3.user("reader", READ_INPUT), s3.user("writer", ALLOW_ALL)
    s3.enforce_iam()  # from here on: signed requests, IAM policies, 403s
    output = f"s3://{OUT}/job"
    config = _config(
        s3,
        f"s3://{IN}/clips/manifest.csv",
        output,
        tiny_model_dir,
        reader=reader,
        writer=writer,
        **{"execution.executor": "ray"},
    )
    caplog.set_level(logging.DEBUG, logger="videoindex")

    result = run_job(config)
    assert result.exit_code == EXIT_VIDEOS_FAILED, result.summary
    assert result.summary["shards_committed"] == 2 and result.summary["videos"] == 4
    out = s3.fs(*writer)
    videos = {row["uri"].rsplit("/", 1)[1]: row for row in _videos(out, f"{OUT}/job")}
    assert sorted(videos) == ["carphone.mp4", "demo.mp4", "gone.mp4", "secret.mp4"]
    for name, camera in (("demo.mp4", "front"), ("carphone.mp4", "rear")):
        assert videos[name]["status"] == "ok" and videos[name]["num_clips"] == 2
        assert json.loads(videos[name]["extra"]) == {"camera": camera}
    assert videos["carphone.mp4"]["uri"] == f"s3://{IN}/clips/carphone.mp4"
    assert videos["gone.mp4"]["error_type"] == "not_found"
    assert "gone.mp4" in videos["gone.mp4"]["error_message"]
    assert videos["secret.mp4"]["error_type"] == "permission"
    assert "forbidden" in videos["secret.mp4"]["error_message"].lower()
    assert json.loads(videos["gone.mp4"]["extra"]) == {"camera": "side"}
    clips = pads.dataset(f"{OUT}/job/clips", filesystem=out, partitioning="hive", format="parquet")
    assert clips.count_rows() == 4

    status = job_status(output, s3.options(*writer))
    assert status["shards"]["committed"] == status["shards"]["total"] == 2
    assert status["videos"] == 4 and status["clips"] == 4

    # resume: as if the driver died while shard 1 was being written (its files, its commit event and the
    # run's closing checkpoint never made it); only shard 1 runs again, here on the local executor (the
    # same bytes as Ray's: tests/test_ray_executor.py; a resume on Ray: tests/test_faults.py)
    for path in out.find(f"{OUT}/job"):
        if "shard=00001/" in path or path.endswith(".s00001.a01.committed.json") or "/checkpoints/" in path:
            out.rm_file(path)
    local = config.replace(execution=dataclasses.replace(config.execution, executor="local"))
    resumed = run_job(local, resume=True)
    assert resumed.summary["shards_to_run"] == 1 and resumed.summary["shards_committed"] == 2
    again = _videos(out, f"{OUT}/job")
    assert sorted(r["video_id"] for r in again) == sorted(r["video_id"] for r in videos.values())
    assert pads.dataset(f"{OUT}/job/clips", filesystem=out, partitioning="hive").count_rows() == 4

    from videoindex.query import open_index

    with open_index(output, s3.options(*writer)) as index:
        summary = index.summary().to_pylist()[0]
        assert (summary["videos"], summary["videos_error"], summary["clips"]) == (4, 2, 4)

    # secrets never reach _job.json, any object of the output, logs or printed output
    secrets = [reader[1], writer[1]]
    job = out.cat_file(f"{OUT}/job/_job.json").decode()
    assert json.loads(job)["config"]["output"]["storage_options"]["secret"] == "***"
    printed = capfd.readouterr()  # this process's and its children's stdout and stderr
    for name in out.find(f"{OUT}/job"):
        blob = out.cat_file(name)
        assert not any(secret.encode() in blob for secret in secrets), name
    for text in (job, caplog.text, printed.out, printed.err, json.dumps(result.summary)):
        assert not any(secret in text for secret in secrets)
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    worker_logs = [p for p in logs.rglob("*") if p.is_file()]
    assert any("worker" in p.name for p in worker_logs)  # the actors' and decode workers' own logs
    for path in worker_logs:
        blob = path.read_bytes()
        assert not any(secret.encode() in blob for secret in secrets), path


def test_missing_input_bucket_is_a_plan_error(s3, tiny_model_dir):
    s3.fs().mkdir(OUT)
    for uri in (
        "s3://no-such-input/videos/",
        "s3://no-such-input/videos/*.mp4",
        "s3://no-such-input/m.csv",
    ):
        config = _config(s3, uri, f"s3://{OUT}/job", tiny_model_dir)
        with pytest.raises(PlanError, match="bucket 'no-such-input' does not exist"):
            list_inputs(config.input)
    config = _config(s3, "s3://no-such-input/videos/", f"s3://{OUT}/job", tiny_model_dir)
    with pytest.raises(PlanError, match="no-such-input"):
        run_job(config)
    assert not s3.fs().find(OUT)  # nothing was written


def test_missing_or_read_only_output_fails_before_work(s3, tiny_model_dir):
    admin = s3.fs()
    _upload_inputs(admin)
    admin.mkdir("read-only-out")
    input_uri = f"s3://{IN}/clips/"
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-output' does not exist"):
        fs, root = storage.filesystem("s3://no-such-output/job", s3.options())
        storage.check_output_writable(fs, root, "s3://no-such-output/job")
    with pytest.raises(FileNotFoundError, match="no-such-output"):
        run_job(_config(s3, input_uri, "s3://no-such-output/job", tiny_model_dir))

    reader = s3.user("reader", READ_INPUT)
    s3.enforce_iam()
    uri = "s3://read-only-out/job"
    fs, root = storage.filesystem(uri, s3.options(*reader))
    with pytest.raises(PermissionError, match="read-only-out.*not writable"):
        storage.check_output_writable(fs, root, uri)
    with pytest.raises(PermissionError, match="read-only-out"):
        run_job(_config(s3, input_uri, uri, tiny_model_dir, reader=reader, writer=reader))
    assert not s3.fs(*reader).find("read-only-out")


def test_output_holding_another_jobs_tables_is_refused(s3, tiny_model_dir):
    admin = s3.fs()
    _upload_inputs(admin)
    admin.mkdir(OUT)
    admin.pipe_file(f"{OUT}/job/videos/shard=00000/part-00000.parquet", b"someone else's")
    config = _config(s3, f"s3://{IN}/clips/", f"s3://{OUT}/job", tiny_model_dir)
    with pytest.raises(JobMismatchError, match="videos"):
        run_job(config)
    assert admin.find(f"{OUT}/job") == [f"{OUT}/job/videos/shard=00000/part-00000.parquet"]


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": f"{code} happened"},
                "ResponseMetadata": {"HTTPStatusCode": status}}  # fmt: skip
    return botocore.exceptions.ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [("SlowDown", 503, True), ("503", 503, True), ("InternalError", 500, True), ("Throttling", 400, True),
     ("RequestTimeout", 400, True), ("NoSuchKey", 404, False), ("404", 404, False),
     ("AccessDenied", 403, False), ("NoSuchBucket", 404, False), ("InvalidAccessKeyId", 403, False)],
)  # fmt: skip
def test_error_classification(code, status, transient):
    from s3fs.errors import translate_boto_error

    error = _client_error(code, status)
    assert storage.is_transient(error) is transient
    assert storage.is_transient(translate_boto_error(error)) is transient  # what s3fs raises


def test_connection_errors_are_transient():
    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"))
    assert storage.is_transient(OSError(errno.ECONNRESET, "Connection reset by peer"))
    assert storage.is_transient(ConnectionResetError())
    assert not storage.is_transient(FileNotFoundError("bucket/key"))
    assert not storage.is_transient(ValueError("file_503.mp4 is odd"))


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_with_retries_against_injected_failures(s3, mode):
    admin = s3.fs()
    admin.mkdir(IN)
    admin.pipe_file(f"{IN}/a.bin", b"payload")
    with FlakyProxy(s3.url) as proxy:
        # no retries inside botocore or s3fs: every failure reaches with_retries
        no_retries = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(proxy.url, config_kwargs=no_retries))
        fs.retries = 1
        calls: list[str] = []

        def cat(name: str) -> bytes:
            calls.append(name)
            return fs.cat_file(f"{IN}/{name}")

        proxy.mode, proxy.fail = mode, 2
        assert storage.with_retries(lambda: cat("a.bin"), what="get", base_delay_s=0.01) == b"payload"
        assert proxy.fail == 0 and len(calls) >= 2  # (aiohttp may retry a reset connection once itself)
        calls.clear()
        with pytest.raises(FileNotFoundError):
            storage.with_retries(lambda: cat("missing.bin"), what="get", base_delay_s=0.01)
        assert len(calls) == 1  # a permanent error is not retried
        calls.clear()
        proxy.fail = 10
        with pytest.raises(Exception) as raised:  # noqa: B017 (an OSError or botocore's ConnectionClosedError)
            storage.with_retries(lambda: cat("a.bin"), what="get", attempts=3, base_delay_s=0.01)
        assert len(calls) == 3 and storage.is_transient(raised.value)


def test_listings_never_stale_across_writers(s3):
    """Markers written by other processes are seen at once (s3fs's listing cache is off)."""
    uri, ledger = f"s3://{OUT}/job", f"{OUT}/job/_ledger/committed"
    other = s3.fs()  # an actor in another process
    other.mkdir(OUT)
    other.pipe_file(f"{ledger}/shard-00000.json", b"{}")
    fs, root = storage.filesystem(uri, s3.options())
    assert storage.list_names(fs, storage.join(root, "_ledger")) == ["committed/shard-00000.json"]
    other.pipe_file(f"{ledger}/shard-00001.json", b"{}")
    assert storage.filesystem(uri, s3.options())[0] is fs  # the driver's cached instance...
    names = storage.list_names(fs, storage.join(root, "_ledger"))
    assert names == ["committed/shard-00000.json", "committed/shard-00001.json"]  # ...sees the new marker
    assert storage.read_json(fs, f"{ledger}/shard-00001.json") == {}


def test_a_streamed_write_appears_whole_or_not_at_all(s3):
    """storage.write_streamed (compacted embeddings): a multipart upload whose writer fails after two
    parts is aborted, so no partial object appears; a whole one reads back."""
    s3.fs().mkdir(OUT)
    fs, root = storage.filesystem(f"s3://{OUT}/streamed", {**s3.options(), "default_block_size": 5 * 2**20})
    part = b"x" * (5 * 2**20 + 1)

    def fails_late(fh) -> None:
        fh.write(part)
        fh.write(part)  # two parts uploaded by now
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError, match="died"):
        storage.write_streamed(fs, f"{root}/big.bin", fails_late)
    assert not fs.exists(f"{root}/big.bin")
    assert not s3.fs().list_multipart_uploads(OUT)  # aborted, not left to bill
    storage.write_streamed(fs, f"{root}/big.bin", lambda fh: fh.write(part * 2))
    assert fs.cat_file(f"{root}/big.bin") == part * 2


def test_anonymous_access_lists_a_public_bucket(s3):
    _upload_inputs(s3.fs())
    rows = list_inputs(load_config(None, {"input.uri": f"s3://{IN}/clips/", "output.uri": "unused",
                                          "input.storage_options": {"client_kwargs": {"endpoint_url": s3.url}, "anon": True}}).input)  # fmt: skip
    assert sorted(r["uri"] for r in rows) == [f"s3://{IN}/clips/carphone.mp4", f"s3://{IN}/clips/demo.mp4"]


def _noisy_video(path, *, frames: int, size: tuple[int, int]):
    """An H.264 video of random pixels (incompressible: about 1.5 bytes per pixel per frame)."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_a_video_is_read_once_from_object_storage(s3, tiny_model_dir, tmp_path):
    """A 20 MiB video decoded in many chunks: bytes read <= 1.05 x its size + 1 MiB and GETs <= size / 8 MiB
    + 10, counted at an HTTP proxy in front of the S3 server, for every decoder."""
    video = _noisy_video(tmp_path / "long.mp4", frames=400, size=(320, 240))
    size = video.stat().st_size
    assert size > 16 * 2**20
    s3.fs().mkdir(IN)
    s3.fs().put_file(str(video), f"{IN}/long/long.mp4")
    s3.fs().mkdir(OUT)
    for decoder in ("pyav", "decord"):
        with FlakyProxy(s3.url) as proxy:
            options = s3_options(proxy.url)
            config = small_job_config(f"s3://{IN}/long/", f"s3://{OUT}/{decoder}", tiny_model_dir, **{
                "input.storage_options": options, "output.storage_options": options, "decode.decoder": decoder,
                "decode.chunk_clips": 1, "sampling.clip_stride": 2})  # fmt: skip
            result = run_job(config)
            gets, read = proxy.reads_of("long/long.mp4")
        assert result.exit_code == 0 and result.summary["clips"] == 13, result.summary  # 13 chunks
        assert read <= 1.05 * size + 2**20, (decoder, read / size)
        assert gets <= size / 2**23 + 10, (decoder, gets)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_the_container_index_is_read_once_however_long_the_video(s3, tmp_path, monkeypatch, decoder):
    """Blocks of 512 KiB on a 20 MiB MP4 whose index (moov) is at its end: the decode pass opens the file
    again and the demuxer reads past the last frame into the index, which stays cached while the LRU of
    data blocks moves on."""
    from videoindex.config import DecodeConfig, SamplingConfig
    from videoindex.format.plans import VideoTask
    from videoindex.stages import source
    from videoindex.stages.decode import DecodeSettings, VideoEnd, decode_video
    from videoindex.stages.preprocess import PreprocessSpec

    monkeypatch.setattr(source, "REMOTE_BLOCK_SIZE", 2**19)
    video = _noisy_video(tmp_path / "long.mp4", frames=400, size=(320, 240))
    with open(video, "rb") as fh:
        assert fh.read(32).find(b"ftyp") >= 0 and b"moov" not in fh.read(
            2**19
        )  # the index is not at the head
    size = video.stat().st_size
    s3.fs().mkdir(IN)
    s3.fs().put_file(str(video), f"{IN}/long.mp4")
    settings = DecodeSettings(SamplingConfig(clip_stride=2), DecodeConfig(decoder=decoder, chunk_clips=1),
                              PreprocessSpec(resize_short_side=32, crop_size=32))  # fmt: skip
    with FlakyProxy(s3.url) as proxy:
        settings = dataclasses.replace(settings, storage_options=s3_options(proxy.url))
        events = list(decode_video(VideoTask(f"s3://{IN}/long.mp4", "v", None, None, None, 0), settings))
        gets, read = proxy.reads_of("long.mp4")
    assert isinstance(events[-1], VideoEnd), events[-1]
    assert (read, gets) == (size, -(-size // 2**19))  # every block fetched once


def _requests(proxy: FlakyProxy, argv: list[str]) -> int:
    """Requests one `videoindex` command sends (it must succeed)."""
    from videoindex.cli import main

    before = len(proxy.log)
    assert main(argv) == 0, argv
    return len(proxy.log) - before


def test_bookkeeping_requests_do_not_grow_with_the_shards(s3, tiny_model_dir, tmp_path, capsys):
    """Jobs of 6 and of 24 one-video shards on S3: status, query summary, a resume with nothing to do and,
    once compacted, a scan of the videos table and a `similar` send the same number of requests for both
    (at most 40), counted at a proxy in front of the server."""
    from tests.videogen import write_index_video

    video = write_index_video(tmp_path / "v.mp4", frames=3)
    admin = s3.fs()
    admin.mkdir(IN)
    admin.mkdir(OUT)
    counts = {}
    for shards in (6, 24):
        for i in range(shards):
            admin.put_file(str(video), f"{IN}/n{shards}/v{i:03d}.mp4")
        with FlakyProxy(s3.url) as proxy:
            options = s3_options(proxy.url)
            output = f"s3://{OUT}/n{shards}"
            config = small_job_config(f"s3://{IN}/n{shards}/", output, tiny_model_dir, **{
                "input.storage_options": options, "output.storage_options": options, "output.shard_size": 1})  # fmt: skip
            assert run_job(config).exit_code == 0
            flags = ["--storage-option", f"client_kwargs={json.dumps({'endpoint_url': proxy.url})}"]
            counts[shards] = {
                "status": _requests(proxy, ["status", output, *flags]),
                "query summary": _requests(proxy, ["query", output, "summary", *flags]),
                "resume": _requests(proxy, ["resume", output, "--no-progress", *flags]),
            }
            # a read of the videos table opens one file per shard until the index is compacted
            count_videos = ["query", output, "sql", "SELECT count(*) FROM videos", *flags]
            assert _requests(proxy, count_videos) >= shards
            # and `similar` every shard's clips file until the embeddings are compacted
            similar = ["query", output, "similar", f"s3://{IN}/n{shards}/v003.mp4", "-k", "3", *flags]
            assert _requests(proxy, similar) >= shards
            assert _requests(proxy, ["compact", output, *flags]) > 0
            counts[shards]["query videos, compacted"] = _requests(proxy, count_videos)
            counts[shards]["query similar, compacted"] = _requests(proxy, similar)
        capsys.readouterr()
    print(counts)
    assert counts[6] == counts[24], counts
    assert max(counts[24].values()) <= 40, counts


def test_a_storage_failure_mid_video_is_a_retryable_storage_error(s3, tiny_model_dir, tmp_path):
    """The object store stops serving a video after its first 8 MiB block (S3's InternalError, which s3fs
    does not retry): the video fails as `storage` (retryable, with the URI), the job goes on, and `resume
    --retry-failed` indexes it once the store serves it again. The failed block is asked for once, not
    again for every read the demuxer makes after the error. (Reset connections are s3fs's retries, 25 s
    of them per read: test_with_retries_against_injected_failures covers them without a decode.)"""
    video = _noisy_video(tmp_path / "long.mp4", frames=400, size=(320, 240))
    fine = _noisy_video(tmp_path / "fine.mp4", frames=20, size=(64, 48))
    s3.fs().mkdir(IN)
    s3.fs().put_file(str(video), f"{IN}/flaky/long.mp4")
    s3.fs().put_file(str(fine), f"{IN}/flaky/fine.mp4")
    s3.fs().mkdir(OUT)

    refused = []

    def second_block(method: str, path: str, headers: dict) -> bool:
        start = headers.get("Range", headers.get("range", "bytes=0-")).removeprefix("bytes=").split("-")[0]
        refuse = method == "GET" and path.split("?")[0].endswith("long.mp4") and int(start or 0) >= 2**23
        refused.extend([path] if refuse else [])
        return refuse

    with FlakyProxy(s3.url) as proxy:
        proxy.mode = "500"
        proxy.fail_when = second_block
        # One try per request (botocore's legacy max_attempts 1 is one retry: two GETs per failure).
        options = s3_options(
            proxy.url, config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}}
        )
        config = small_job_config(f"s3://{IN}/flaky/", f"s3://{OUT}/flaky", tiny_model_dir, **{
            "input.storage_options": options, "output.storage_options": options, "output.shard_size": 2})  # fmt: skip
        assert run_job(config).exit_code == EXIT_VIDEOS_FAILED
        videos = {row["uri"].rsplit("/", 1)[1]: row for row in _videos(s3.fs(), f"{OUT}/flaky")}
        assert videos["fine.mp4"]["status"] == "ok"
        assert videos["long.mp4"]["error_type"] == "storage", videos["long.mp4"]["error_message"]
        assert f"s3://{IN}/flaky/long.mp4" in videos["long.mp4"]["error_message"]
        assert len(refused) == 1, refused  # more when reads after the error fetched the block again
        proxy.fail_when = None  # the store is back
        assert run_job(config, resume=True, retry_failed=True).exit_code == 0
    videos = {row["uri"].rsplit("/", 1)[1]: row for row in _videos(s3.fs(), f"{OUT}/flaky")}
    assert videos["long.mp4"]["status"] == "ok" and videos["long.mp4"]["num_clips"] > 0
