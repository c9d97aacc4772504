"""Bytes read from S3 per video against its size, per decoder and read-ahead policy (moto on 127.0.0.1).

    .venv/bin/python benchmarks/bench_s3_bytes.py [--long-seconds 60] [--repeat 1]

Serves the sample videos and a synthetic long video (H.264 640x360 30 fps, 2 s GOP, written with PyAV)
from moto's S3 server and opens each through ``videoindex.decode.open_video`` as a job does (PyAV probe,
then decord or PyAV), reading the clips of two sampling plans: ``uniform`` (8 clips spread over the
video) and ``sliding`` (every frame, the default). Prints, per video and variant: file size, bytes
fetched from S3 (``S3File._fetch_range``, i.e. what went over the wire), ratio, GET requests and wall
time. moto answers in well under a millisecond; on real S3 add ~20-60 ms first-byte latency per GET.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import s3fs

from videoindex.config import SamplingConfig
from videoindex.decode import open_video
from videoindex.sampling import plan_clips

SAMPLES = Path(__file__).resolve().parents[1] / "videoindex" / "samples"
MiB = 2**20

COUNT = {"bytes": 0, "requests": 0}
_fetch_range = s3fs.core.S3File._fetch_range


def _counted_fetch_range(self: Any, start: int, end: int) -> bytes:
    data = _fetch_range(self, start, end)
    COUNT["bytes"] += len(data)
    COUNT["requests"] += 1
    return data


s3fs.core.S3File._fetch_range = _counted_fetch_range


class _Shared:
    """One open S3 file handed out again: close() rewinds instead of closing (keeps the cache)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def close(self) -> None:
        self._handle.seek(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class TunedFS:
    """An s3fs filesystem whose open() uses one block size and cache type, whatever the caller asks.

    ``shared``: the PyAV probe and the decoder of one video read through one handle and its cache (what
    decode._Source would do if it opened a remote file once), instead of one fresh handle per open.
    """

    def __init__(self, fs: s3fs.S3FileSystem, block_size: int, cache_type: str, shared: bool) -> None:
        self._fs, self.block_size, self.cache_type, self.shared = fs, block_size, cache_type, shared
        self._handles: dict[str, _Shared] = {}

    def forget(self) -> None:
        self._handles.clear()

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        kwargs.pop("cache_options", None)  # the variant's cache type replaces what decode.py asks for
        kwargs.update(block_size=self.block_size, cache_type=self.cache_type)
        if not self.shared:
            return self._fs.open(path, mode, **kwargs)
        if path not in self._handles:
            self._handles[path] = _Shared(self._fs.open(path, mode, **kwargs))
        return self._handles[path]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def write_long_video(path: Path, seconds: int, size: tuple[int, int] = (640, 360), fps: int = 30) -> None:
    """Moving gradients plus noise, so the bitrate is that of real footage (a few Mbit/s)."""
    width, height = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"g": str(2 * fps), "preset": "veryfast", "crf": "23", "movflags": "+faststart"}
        for i in range(seconds * fps):
            base = ((xx + 3 * i) % 256 + (yy + i) % 256) // 2
            noise = rng.integers(0, 40, size=(height, width), dtype=np.int16)
            gray = np.clip(base + noise, 0, 255).astype(np.uint8)
            rgb = np.stack([gray, np.roll(gray, i, axis=1), 255 - gray], axis=-1)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def measure(fs: TunedFS, uri: str, decoder: str, sampling: SamplingConfig, chunk_clips: int = 16) -> dict:
    """Open and read every chunk of clips as extract() does (one open per chunk); bytes, GETs, seconds."""
    COUNT.update(bytes=0, requests=0)
    started = time.perf_counter()
    getattr(fs, "forget", lambda: None)()
    with open_video(uri, decoder=decoder, fs=fs, fallback_to_pyav=False) as reader:
        clips = plan_clips(reader.meta.frames, sampling, 16)
        first = clips[:chunk_clips]
        reader.read(sorted({i for c in first for i in c.frame_indices}))
    for n in range(chunk_clips, len(clips), chunk_clips):  # follow-up chunks open the video again
        getattr(fs, "forget", lambda: None)()  # another decode task: nothing cached
        with open_video(uri, decoder=decoder, fs=fs, fallback_to_pyav=False) as reader:
            reader.read(sorted({i for c in clips[n : n + chunk_clips] for i in c.frame_indices}))
    return {"bytes": COUNT["bytes"], "requests": COUNT["requests"], "s": time.perf_counter() - started,
            "clips": len(clips)}  # fmt: skip


VARIANTS = [("decord", 8 * MiB, "readahead", False), ("decord", 8 * MiB, "readahead", True)] + [
    ("pyav", bs * MiB, cache, shared) for shared in (False, True) for cache in ("readahead", "blockcache")
    for bs in (1, 4, 8)
] + [("pyav", 256 * 1024, "first", True)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long-seconds", type=int, default=60)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.s3server
    from tests.s3server import moto_server

    with tempfile.TemporaryDirectory() as tmp, moto_server() as server:
        long_video = Path(tmp) / f"synthetic_{args.long_seconds}s_640x360.mp4"
        t0 = time.perf_counter()
        write_long_video(long_video, args.long_seconds)
        print(
            f"wrote {long_video.name}: {long_video.stat().st_size / MiB:.1f} MiB in {time.perf_counter() - t0:.0f} s"
        )
        fs = server.fs()
        fs.mkdir("bench")
        videos = [SAMPLES / "demo.mp4", SAMPLES / "bigbuckbunny.mp4", long_video]
        for video in videos:
            fs.put_file(str(video), f"bench/{video.name}")
        samplings = {"uniform8": SamplingConfig(strategy="uniform", clips_per_video=8),
                     "sliding": SamplingConfig(strategy="sliding")}  # fmt: skip
        header = (
            f"{'video':30} {'MiB':>6} {'sampling':9} {'decoder':7} {'block':>6} {'cache':10} {'handle':6} "
        )
        print(header + f"{'clips':>5} {'MiB read':>8} {'ratio':>6} {'GETs':>5} {'s':>6}")
        for video in videos:
            size = video.stat().st_size
            for sname, sampling in samplings.items():
                for decoder in ("decord", "pyav"):  # as videoindex ships: decode.py's own shared handle
                    r = measure(fs, f"s3://bench/{video.name}", decoder, sampling)
                    print(f"{video.name:30} {size / MiB:6.2f} {sname:9} {decoder:7} {'8':>5}M {'SHIPPED':10} {'shared':6} "
                          f"{r['clips']:5d} {r['bytes'] / MiB:8.2f} {r['bytes'] / size:6.2f} {r['requests']:5d} "
                          f"{r['s']:6.2f}", flush=True)  # fmt: skip
                for decoder, block, cache, shared in VARIANTS:
                    tuned = TunedFS(fs, block, cache, shared)
                    r = measure(tuned, f"s3://bench/{video.name}", decoder, sampling)
                    print(f"{video.name:30} {size / MiB:6.2f} {sname:9} {decoder:7} {block / MiB:5.2g}M {cache:10} "
                          f"{'shared' if shared else 'fresh':6} "
                          f"{r['clips']:5d} {r['bytes'] / MiB:8.2f} {r['bytes'] / size:6.2f} {r['requests']:5d} "
                          f"{r['s']:6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
