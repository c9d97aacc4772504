"""Shared pieces of the pipeline benchmarks: synthetic videos, an input folder, memory sampling, tables.

Nothing here is part of videoindex itself; it only measures it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "videoindex" / "samples"
SAMPLE_NAMES = ("bigbuckbunny.mp4", "carphone_pristine.mp4", "demo.mp4")


def write_synthetic_video(
    path: Path, *, seconds: float, size: tuple[int, int], fps: int = 30, seed: int = 0
) -> Path:
    """An H.264 video with texture and motion, so decoding costs what a real camera video costs.

    A random texture twice the frame size pans diagonally while a bright square moves across it; CRF 23
    and a 2 s GOP are typical of web video. ``size`` is (width, height).
    """
    import av

    width, height = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((8, 8, 1), np.uint8))  # 2x the frame, blocky: compressible detail
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.options = {"crf": "23", "preset": "veryfast"}
        for i in range(int(seconds * fps)):
            dx, dy = (3 * i) % width, (2 * i) % height
            frame = texture[dy : dy + height, dx : dx + width].copy()
            x, y = (7 * i) % (width - 48), (5 * i) % (height - 48)
            frame[y : y + 48, x : x + 48] = (255, 255 - i % 256, i % 256)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    tmp.rename(path)
    return path


def input_parser(doc: str | None, *, seconds: float) -> argparse.ArgumentParser:
    """The arguments every job benchmark shares: which model, and the synthetic input beside the samples."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("full", "tiny"), default="tiny")
    parser.add_argument("--videos", type=int, default=3, help="synthetic videos besides the 3 samples")
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each synthetic video")
    parser.add_argument("--size", default="640x360", help="synthetic video WIDTHxHEIGHT")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videoindex-bench")
    return parser


def prepare_input(workdir: Path, *, videos: int, seconds: float, size: tuple[int, int]) -> Path:
    """``workdir/input``: the bundled sample videos plus ``videos`` synthetic ones (cached by parameters)."""
    cache = workdir / "synthetic"
    cache.mkdir(parents=True, exist_ok=True)
    folder = workdir / "input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in SAMPLE_NAMES:
        shutil.copy(SAMPLES / name, folder / name)
    for n in range(videos):
        name = f"synthetic-{size[0]}x{size[1]}-{seconds:g}s-{n:03d}.mp4"
        if not (cache / name).exists():
            write_synthetic_video(cache / name, seconds=seconds, size=size, seed=n)
        os.link(cache / name, folder / name)
    return folder


# -------------------------------------------------------------------------------------------- memory


def _shmem_bytes(pid: int) -> int:
    """Resident shared-memory pages of a process (``RssShmem``: the object store's /dev/shm mapping); 0 off Linux."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _role(proc: psutil.Process) -> str | None:
    """Ray names its worker processes after what they run (``ray::ModelActor.index``, ``ray::decode_task``)."""
    try:
        title = " ".join(proc.cmdline()[:1])
    except (psutil.Error, OSError):
        return None
    if "ModelActor" in title:
        return "actor"
    if "decode_task" in title or "_warm_up_held" in title:
        return "decode"
    if title.startswith("ray::"):
        return "idle"
    return None


@dataclass
class MemorySampler:
    """Polls memory of the driver, model actors and decode workers, and object store bytes, in a thread.

    Per process it records RSS, and RSS less its resident shared-memory pages (``RssShmem``): a Ray worker
    maps the object store's /dev/shm file, and every page of it the worker writes (a decode result) or
    reads (the actor's clips) counts in its RSS although the store owns it, so the RSS of a long-lived
    worker creeps up to the store pages it ever touched. Ray's docs measure worker heap as RSS - SHR for
    that reason; the store's own use is reported separately. A Ray worker process that ever ran a decode task
    counts as a decode worker from then on (between tasks its title says IDLE). Peaks are kept separately
    for the first and second half of the run (by time), so "stays flat as the input grows" can be read off
    one run.
    """

    interval_s: float = 1.0
    store_every: int = 5  # samples per object store query: each asks every Ray worker for its stats
    samples: list[dict[str, Any]] = field(default_factory=list)
    roles: dict[int, str] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)  # user+system seconds per pid, last seen

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._store = _ObjectStore()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        driver = psutil.Process()
        count = 0
        while not self._stop.is_set():
            info = driver.memory_info()
            store = self._store.used() if count % self.store_every == 0 else None
            count += 1
            sample: dict[str, Any] = {"t": time.time(), "store": store,
                                      "driver": info.rss - _shmem_bytes(driver.pid),
                                      "driver_rss": info.rss, "actor": 0, "actor_rss": 0, "decode": 0,
                                      "decode_rss": 0}  # fmt: skip
            for proc in psutil.process_iter():
                role = _role(proc)
                if role in ("actor", "decode"):
                    self.roles[proc.pid] = role
                role = self.roles.get(proc.pid)
                if role is None:
                    continue
                try:
                    info = proc.memory_info()
                    sample[role] = max(sample[role], info.rss - _shmem_bytes(proc.pid))
                    sample[f"{role}_rss"] = max(sample[f"{role}_rss"], info.rss)
                    times = proc.cpu_times()
                    self.cpu_s[proc.pid] = times.user + times.system
                except psutil.Error:
                    pass
            self.samples.append(sample)
            self._stop.wait(self.interval_s)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) used by the actor and decode worker processes seen."""
        out = {"actor": 0.0, "decode": 0.0}
        for pid, seconds in self.cpu_s.items():
            out[self.roles[pid]] += seconds
        return out

    def peaks(self, *, rss: bool = False) -> dict[str, tuple[float, float]]:
        """Per role: (peak MiB in the first half of the run, peak MiB in the second half).

        RSS less object-store pages per process, or with ``rss`` the raw RSS; the object store either way.
        """
        if not self.samples:
            return {}
        middle = (self.samples[0]["t"] + self.samples[-1]["t"]) / 2
        halves = ([s for s in self.samples if s["t"] <= middle], [s for s in self.samples if s["t"] > middle])
        out = {}
        for role in ("driver", "actor", "decode", "store"):
            key = f"{role}_rss" if rss and role != "store" else role
            values = [max((s[key] or 0 for s in half), default=0) / 2**20 for half in halves]
            out[role] = (values[0], values[1])
        return out


class _ObjectStore:
    """Bytes used in the Ray object store (all nodes), through the API behind ``ray memory``."""

    def __init__(self) -> None:
        self._state: Any = None

    def used(self) -> int | None:
        try:
            import ray
            from ray._private import internal_api

            if not ray.is_initialized():
                return None
            if self._state is None:
                self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
            reply = internal_api.get_memory_info_reply(self._state, timeout_seconds=5)
            return int(reply.store_stats.object_store_bytes_used)
        except Exception:  # private API: a benchmark must not die of it
            return None


# -------------------------------------------------------------------------------------------- output


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def timed(fn: Any, *, min_s: float, min_calls: int = 2) -> tuple[int, float, float]:
    """Call ``fn`` (returns items done) until ``min_s`` s and ``min_calls`` calls: (items, wall s, CPU s)."""
    done, calls, started, cpu = 0, 0, time.perf_counter(), cpu_seconds()
    while calls < min_calls or time.perf_counter() - started < min_s:
        done += fn()
        calls += 1
    return done, time.perf_counter() - started, cpu_seconds() - cpu


def timed_command(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of a command run from the repository root, as a user pays them; exits on failure."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds
