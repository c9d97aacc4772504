"""A decoder plug-in for fault tests (``decode.decoder: tests.faulty_decoder:open_faulty``).

It opens videos with the real decoder, after misbehaving on request: a sibling file ``VIDEO.hang``
makes it sleep forever, ``VIDEO.crash`` kills the worker process, ``VIDEO.slow`` (holding seconds)
sleeps that long first so that a test can kill things mid-shard, ``VIDEO.hog``
(holding a number of MiB) allocates that much, in steps, as a runaway decode would. Removing the
sibling file "repairs" the video for a resume.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from videoindex.stages.video import open_video


def open_faulty(uri: str, *, decoder: str, fs: Any, fallback_to_pyav: bool, **options: Any) -> Any:
    path = uri.removeprefix("file://")
    if os.path.exists(f"{path}.hang"):
        while True:
            time.sleep(3600)
    if os.path.exists(f"{path}.crash"):
        os._exit(13)
    if os.path.exists(f"{path}.hog"):
        _hog(int(Path(f"{path}.hog").read_text()))
    if os.path.exists(f"{path}.slow"):
        time.sleep(float(Path(f"{path}.slow").read_text() or 1.0))
    return open_video(uri, decoder=decoder, fs=fs, fallback_to_pyav=fallback_to_pyav, **options)  # scale


def _hog(mib: int) -> None:
    """Allocate and fault in ``mib`` MiB, 256 MiB every 50 ms (slow enough for a memory monitor checking
    every 100 ms to see it before the machine runs short: it overshoots by about 0.5 GiB).

    The kernel populates each step in one call (MAP_POPULATE): touching the pages from Python took 0.4 s
    per 128 MiB on a small VM, so the test waited on the hog rather than on the monitor."""
    import mmap

    step = 256 * 2**20
    held = []
    for _ in range(mib // 256):
        held.append(mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE))
        time.sleep(0.05)
    for block in held:
        block.close()
