"""Long videos: a decode worker's memory stays flat chunk after chunk, at real resolutions.

    .venv/bin/python benchmarks/bench_long_video.py [--minutes 120] [--size 1280x720] [--decoder pyav]
        [--chunk-clips 16] [--max-clips N] [--limit-chunks N]

Writes a 60 s H.264 segment (x264 defaults, the same content as bench_decode.py) and repeats its packets
into a ``--minutes`` long video (stream copy with shifted timestamps: a 2-hour 720p file in seconds, a
valid stream since each segment starts at a keyframe). Then runs ``decode_video`` over it in this
process, the way one decode worker does, sampling this process's RSS every 5 ms. Prints the peak RSS of
groups of chunks from the first to the last: flat memory means the last chunks peak no higher than the
first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import write_test_video  # noqa: E402
from videoindex.config import DecodeConfig, SamplingConfig  # noqa: E402
from videoindex.format.plans import VideoTask  # noqa: E402
from videoindex.stages.decode import ClipBatch, DecodeSettings, VideoEnd, VideoPlan, decode_video  # noqa: E402
from videoindex.stages.plan import video_id  # noqa: E402
from videoindex.stages.preprocess import PreprocessSpec  # noqa: E402


def repeat_video(segment: Path, path: Path, *, times: int) -> Path:
    """``segment``'s packets ``times`` over, timestamps shifted: a long video without encoding it."""
    if path.exists():
        return path
    with av.open(str(segment)) as inp:
        pts = sorted(p.pts for p in inp.demux(inp.streams.video[0]) if p.size)
    span = pts[-1] - pts[0] + (pts[-1] - pts[0]) // (len(pts) - 1)  # the segment plus one frame
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as out:
        stream = None
        for n in range(times):
            with av.open(str(segment)) as inp:
                source = inp.streams.video[0]
                stream = stream or out.add_stream_from_template(source)
                for packet in inp.demux(source):
                    if packet.size:
                        packet.pts, packet.dts = packet.pts + n * span, packet.dts + n * span
                        packet.stream = stream
                        out.mux(packet)
    tmp.rename(path)
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


def run(uri: str, settings: DecodeSettings, limit_chunks: int | None) -> None:
    rss = PeakRSS()
    base = rss.process.memory_info().rss
    started, cpu0 = time.perf_counter(), time.process_time()
    peaks, clips, plan, end = [], 0, None, None
    for event in decode_video(VideoTask(uri, video_id(uri), None, None, None, 0), settings):
        if isinstance(event, VideoPlan):
            plan = event
        elif isinstance(event, ClipBatch):
            clips += len(event.clips)
            peaks.append(rss.reset())
            if limit_chunks is not None and len(peaks) >= limit_chunks:
                break
        else:
            end = event
    rss.stop()
    if end is not None and not isinstance(end, VideoEnd):
        raise SystemExit(f"decode failed: {end}")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    mib = np.array(peaks) / 2**20
    print(f"decoder={settings.decode.decoder} frames={plan.meta.frames} ({plan.meta.width}x{plan.meta.height}) "
          f"clips planned={len(plan.clips)} decoded={clips} chunks={len(peaks)} "
          f"(chunk_clips={settings.decode.chunk_clips}, max_clips_per_video={settings.sampling.max_clips_per_video})")  # fmt: skip
    print(f"RSS before: {base / 2**20:.0f} MiB; peak RSS first chunk: {mib[0]:.0f} MiB, last chunk: {mib[-1]:.0f} "
          f"MiB, max: {mib.max():.0f} MiB (chunk {int(mib.argmax())}), min: {mib.min():.0f} MiB")  # fmt: skip
    for group in np.array_split(np.arange(len(peaks)), min(len(peaks), 8)):
        print(f"  chunks {group[0]:4d}-{group[-1]:4d}: peak RSS {mib[group].max():6.0f} MiB")
    print(f"decode {seconds:.1f} s wall, {cpu:.1f} CPU s, {cpu / max(clips, 1):.4f} CPU s per clip")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT")
    parser.add_argument("--decoder", default="pyav", choices=["pyav", "decord"])
    parser.add_argument("--chunk-clips", type=int, default=16)
    parser.add_argument("--max-clips", type=int, default=None, help="sampling.max_clips_per_video")
    parser.add_argument("--limit-chunks", type=int, default=None, help="stop after N chunks")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videoindex-bench" / "long"
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    segment = write_test_video(
        args.workdir / f"segment-{args.size}-60s.mp4", seconds=60, size=(width, height)
    )
    path = repeat_video(segment, args.workdir / f"long-{args.size}-{args.minutes:g}min.mp4",
                        times=max(1, round(args.minutes)))  # fmt: skip
    print(
        f"video: {path} ({path.stat().st_size / 2**20:.0f} MiB, ready in {time.perf_counter() - started:.0f} s)"
    )
    settings = DecodeSettings(
        sampling=SamplingConfig(max_clips_per_video=args.max_clips),
        decode=DecodeConfig(decoder=args.decoder, chunk_clips=args.chunk_clips),
        preprocess=PreprocessSpec(),
    )
    run(str(path), settings, args.limit_chunks)


if __name__ == "__main__":
    main()
