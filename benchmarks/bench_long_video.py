"""Long videos: decode memory stays flat, chunk after chunk, and --max-clips-per-video caps the work.

    .venv/bin/python benchmarks/bench_long_video.py [--minutes 120] [--size 64x48] [--fps 25]
        [--decoder decord] [--chunk-clips 16] [--max-clips N] [--limit-chunks N]

Writes a synthetic video (index frames, H.264, written with PyAV), then runs ``extract`` over every
chunk in this process, the way one decode worker would, sampling this process's RSS every 5 ms. Prints,
per chunk group, the decode seconds and the peak RSS, and the peak RSS of the first and the last chunks:
flat memory means the last chunk peaks no higher than the first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.videogen import index_frame  # noqa: E402
from videoindex.config import DecodeConfig, SamplingConfig  # noqa: E402
from videoindex.extract import ExtractRequest, ExtractSettings, extract, follow_up_requests  # noqa: E402
from videoindex.plan import VideoTask, video_id  # noqa: E402
from videoindex.preprocess import PreprocessSpec  # noqa: E402


def write_long_video(path: Path, *, frames: int, fps: int, size: tuple[int, int]) -> Path:
    """``frames`` index frames (the code repeats every 1024 frames), 10 s GOP, ultrafast x264."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = 10 * fps
        stream.options = {"preset": "ultrafast", "crf": "23"}
        pictures = [index_frame(i, size) for i in range(1024)]
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pictures[i % 1024], format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


class PeakRSS:
    """The highest RSS of this process seen since the last reset (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def reset(self) -> int:
        peak, self.peak = self.peak, self.process.memory_info().rss
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--size", default="64x48", help="WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--decoder", default="decord", choices=["decord", "pyav"])
    parser.add_argument("--chunk-clips", type=int, default=16)
    parser.add_argument("--max-clips", type=int, default=None, help="sampling.max_clips_per_video")
    parser.add_argument("--limit-chunks", type=int, default=None, help="stop after N chunks")
    parser.add_argument("--video", type=Path, default=None, help="reuse this video instead of writing one")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    frames = int(args.minutes * 60 * args.fps)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.video or Path(tmp) / "long.mp4"
        if args.video is None:
            started = time.perf_counter()
            write_long_video(path, frames=frames, fps=args.fps, size=(width, height))
            print(f"wrote {frames} frames ({args.minutes:g} min, {width}x{height}) in "
                  f"{time.perf_counter() - started:.1f} s: {path.stat().st_size / 2**20:.1f} MiB")  # fmt: skip
        settings = ExtractSettings(
            sampling=SamplingConfig(max_clips_per_video=args.max_clips),
            decode=DecodeConfig(decoder=args.decoder, chunk_clips=args.chunk_clips),
            preprocess=PreprocessSpec(),
        )
        run(str(path), settings, args.limit_chunks)


def run(uri: str, settings: ExtractSettings, limit_chunks: int | None) -> None:
    rss = PeakRSS()
    base = rss.process.memory_info().rss
    task = VideoTask(uri, video_id(uri), None, None, None, 0)
    started = time.perf_counter()
    first = extract(ExtractRequest(task), settings)
    if first.error is not None:
        raise SystemExit(f"chunk 0 failed: {first.error}")
    peaks, seconds, clips = [rss.reset()], [time.perf_counter() - started], len(first.clips)
    requests = follow_up_requests(first, settings.decode.chunk_clips)[
        : None if limit_chunks is None else limit_chunks - 1
    ]
    first.frames = None
    for request in requests:
        t0 = time.perf_counter()
        result = extract(request, settings)
        if result.error is not None:
            raise SystemExit(f"chunk {request.chunk} failed: {result.error}")
        clips += len(result.clips)
        result.frames = None
        seconds.append(time.perf_counter() - t0)
        peaks.append(rss.reset())
    rss.stop()
    mib = np.array(peaks) / 2**20
    print(f"decoder={settings.decode.decoder} frames={first.meta.frames} clips planned={len(first.all_clips)} "
          f"decoded={clips} chunks={len(peaks)} (chunk_clips={settings.decode.chunk_clips}, "
          f"max_clips_per_video={settings.sampling.max_clips_per_video})")  # fmt: skip
    print(f"RSS before: {base / 2**20:.0f} MiB; peak RSS chunk 0: {mib[0]:.0f} MiB, last chunk: {mib[-1]:.0f} "
          f"MiB, max over chunks: {mib.max():.0f} MiB (chunk {int(mib.argmax())}), min: {mib.min():.0f} MiB")  # fmt: skip
    groups = np.array_split(np.arange(len(peaks)), min(len(peaks), 8))
    for group in groups:
        print(f"  chunks {group[0]:4d}-{group[-1]:4d}: peak RSS {mib[group].max():6.0f} MiB, decode "
              f"{np.mean(np.array(seconds)[group]):.2f} s/chunk")  # fmt: skip
    print(f"total decode {sum(seconds):.1f} s, {clips / sum(seconds):.1f} clips/s")


if __name__ == "__main__":
    main()
