"""The decode stage's cost per clip, memory and object-store reads, against a plain PyAV floor, in one run.

    .venv/bin/python benchmarks/bench_decode.py [--long-minutes 10] [--seconds 60] [--uhd-seconds 10]
                                                [--decoders pyav,pyav-swscale,decord] [--parts cpu,s3,accuracy]

Videos (generated once with PyAV and cached in $TMPDIR/videoindex-bench/decode): H.264 from libx264 with
x264's defaults (preset medium: B frames, b-pyramid; keyint 250), CRF 23, 30 fps, a panning texture with a
moving square: 1280x720 for ``--long-minutes`` (the long video), 1920x1080 for ``--seconds`` and
3840x2160 for ``--uhd-seconds``.

For each video, each decoder runs ``stages.decode.decode_video`` (what a decode worker runs: default
sliding sampling, 16-clip chunks, 224 crops; ``pyav`` with the default ``decode.scale: rgb``,
``pyav-swscale`` with ``swscale``) over the whole video in a fresh subprocess, which reports
its CPU seconds (user + system, all threads, after its imports) and peak RSS (VmHWM; no Ray: no
object-store pages in it). The floor, in
the same kind of subprocess: PyAV decoding every frame in order on one thread and scaling every 4th
frame to a 224 short side with swscale as it comes, nothing else. ``ratio`` is CPU s per clip over the
floor's for the same video. Runs alternate decoders per video, so a machine that drifts affects all.

S3: the videos are served by moto on 127.0.0.1 behind a counting HTTP proxy and each decoder decodes
each from ``s3://``: bytes read and GET requests against the file size. Accuracy: ``decode.scale
swscale`` against the reference pixels (``rgb``), per channel, on the bundled samples and the videos. Goals (issue
16): CPU s per clip <= 1.2x the floor at 720p and 1080p; peak <= 600 MiB at 720p and 1.2 GiB at 4K;
bytes <= 1.05 x size + 1 MiB and GETs <= size / 8 MiB + 10.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table  # noqa: E402

MiB = 2**20


def write_test_video(path: Path, *, seconds: float, size: tuple[int, int], fps: int = 30) -> Path:
    """x264 defaults (B frames, b-pyramid, keyint 250), CRF 23: what a typical web video decodes like."""
    import av
    import numpy as np

    if path.exists():
        return path
    width, height = size
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((8, 8, 1), np.uint8))  # 2x the frame, blocky detail
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "medium"}
        for i in range(int(seconds * fps)):
            dx, dy = (3 * i) % width, (2 * i) % height
            frame = texture[dy : dy + height, dx : dx + width].copy()
            side = height // 8
            x, y = (7 * i) % (width - side), (5 * i) % (height - side)
            frame[y : y + side, x : x + side] = (255, 255 - i % 256, i % 256)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------------ measured in a child

CHILD = r"""
import json, sys, time
import av
from videoindex.config import DecodeConfig, SamplingConfig
from videoindex.format.plans import VideoTask
from videoindex.stages.decode import ClipBatch, DecodeSettings, VideoEnd, decode_video
from videoindex.stages.preprocess import PreprocessSpec, resized_shape
import videoindex.stages.pyav_reader, videoindex.stages.decord_reader

def peak_mib():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

mode, uri, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
started, cpu0 = time.perf_counter(), time.process_time()  # after the imports: start-up is not decoding
if mode == "floor":
    with av.open(uri) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        height, width = resized_shape(stream.codec_context.height, stream.codec_context.width, 224)
        scaled = 0
        for n, frame in enumerate(container.decode(stream)):
            if n % 4 == 0:
                frame.reformat(width=width, height=height, format="rgb24", threads=1).to_ndarray()
                scaled += 1
    result = {"frames_scaled": scaled}
else:
    decoder, _, scale = mode.partition("-")
    settings = DecodeSettings(SamplingConfig(), DecodeConfig(decoder=decoder, scale=scale or "rgb"), PreprocessSpec(),
                              storage_options=options)
    if scale != "swscale":
        import torch
        torch.set_num_threads(1)
    clips, end = 0, None
    for event in decode_video(VideoTask(uri, "bench", None, None, None, 0), settings):
        clips += len(event.clips) if isinstance(event, ClipBatch) else 0
        end = event
    if not isinstance(end, VideoEnd):
        raise SystemExit(f"decode failed: {end}")
    result = {"clips": clips, "frames": end.meta.frames}
result.update(cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - started, peak_mib=peak_mib())
print(json.dumps(result))
"""


def measure(mode: str, uri: str, options: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, uri, json.dumps(options or {})], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {uri} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_table(videos: dict[str, Path], decoders: list[str]) -> None:
    rows = []
    for name, path in videos.items():
        got = {mode: measure(mode, str(path)) for mode in ["floor", *decoders]}
        clips = got[decoders[0]]["clips"]
        floor = got["floor"]["cpu_s"] / clips
        for mode, r in got.items():
            per_clip = r["cpu_s"] / clips
            rows.append([name, mode, clips, f"{per_clip:.4f}", f"{per_clip / floor:.2f}", f"{r['wall_s']:.1f}",
                         f"{r['peak_mib']:.0f}"])  # fmt: skip
    print(markdown_table(["video", "decoder", "clips", "CPU s / clip", "ratio to floor", "wall s",
                          "peak RSS MiB"], rows))  # fmt: skip


def s3_table(videos: dict[str, Path], decoders: list[str]) -> None:
    from tests.s3server import FlakyProxy, moto_server, s3_options

    rows = []
    with moto_server() as server:
        fs = server.fs()
        fs.mkdir("bench")
        for path in videos.values():
            fs.put_file(str(path), f"bench/{path.name}")
        for name, path in videos.items():
            size = path.stat().st_size
            for decoder in decoders:
                with FlakyProxy(server.url) as proxy:
                    measure(decoder, f"s3://bench/{path.name}", s3_options(proxy.url))
                    gets, read = proxy.reads_of(path.name)
                rows.append([name, decoder, f"{size / MiB:.1f}", f"{read / MiB:.1f}", f"{read / size:.3f}", gets,
                             f"{size / 2**23 + 10:.0f}"])  # fmt: skip
    print(
        markdown_table(["video", "decoder", "size MiB", "read MiB", "read / size", "GETs", "GET limit"], rows)
    )


def accuracy_table(videos: dict[str, Path], frames: int = 64) -> None:
    """decode.scale swscale against the reference (rgb: full-resolution RGB + the image processor's resize),
    on the first ``frames`` sampled frames of each video (and the bundled samples: camera footage)."""
    from videoindex.stages.preprocess import resized_shape
    from videoindex.stages.video import open_video, read_frames

    samples = {f"sample {p.name}": p for p in sorted((REPO / "videoindex" / "samples").glob("*.m[kp][v4]"))}
    rows = []
    for name, path in {**samples, **videos}.items():
        got = {}
        for scale in ("rgb", "swscale"):
            with open_video(str(path), decoder="pyav", scale=scale) as reader:
                wanted = list(range(0, min(reader.meta.frames, 4 * frames), 4))
                size = resized_shape(reader.meta.height, reader.meta.width, 224)
                got[scale] = read_frames(reader, wanted, size=size)[0].astype(int)
        diff = abs(got["swscale"] - got["rgb"])
        rows.append([name, len(wanted), ", ".join(str(diff[..., c].max()) for c in range(3)), f"{diff.mean():.2f}",
                     f"{(diff > 2).mean():.1%}"])  # fmt: skip
    print(
        markdown_table(
            ["video", "frames", "max abs diff R, G, B", "mean abs diff", "pixels > 2 levels"], rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the 1080p video")
    parser.add_argument("--uhd-seconds", type=float, default=10.0, help="length of the 4K video")
    parser.add_argument(
        "--decoders",
        default="pyav,pyav-swscale,decord",
        help="decoders to run (pyav-swscale: decode.scale swscale)",
    )
    parser.add_argument("--parts", default="cpu,s3,accuracy", help="which tables: cpu, s3, accuracy")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videoindex-bench" / "decode"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    videos = {
        f"720p {args.long_minutes:g} min": write_test_video(
            args.workdir / f"720p-{args.long_minutes:g}min.mp4", seconds=60 * args.long_minutes, size=(1280, 720)),
        f"1080p {args.seconds:g} s": write_test_video(
            args.workdir / f"1080p-{args.seconds:g}s.mp4", seconds=args.seconds, size=(1920, 1080)),
        f"4K {args.uhd_seconds:g} s": write_test_video(
            args.workdir / f"2160p-{args.uhd_seconds:g}s.mp4", seconds=args.uhd_seconds, size=(3840, 2160)),
    }  # fmt: skip
    decoders = args.decoders.split(",")
    for name, path in videos.items():
        print(f"{name}: {path} ({path.stat().st_size / MiB:.1f} MiB)")
    parts = args.parts.split(",")
    if "cpu" in parts:
        cpu_table(videos, decoders)
    if "s3" in parts:
        s3_table(videos, decoders)
    if "accuracy" in parts:
        accuracy_table(videos)


if __name__ == "__main__":
    main()
