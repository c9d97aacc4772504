"""Allocator settings of long-lived workers (videoindex/memory.py), checked on glibc itself.

Each probe runs in a fresh interpreter with a clean malloc environment, once without the setting (the
control, which must show the problem) and once with it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from videoindex.memory import DECODE_WORKER_ENV

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ, reason="probes glibc's own malloc"
)
REPO = Path(__file__).resolve().parents[1]

ARENA_PROBE = """
import ctypes, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
blocks = []
thread = threading.Thread(target=lambda: blocks.append(libc.malloc(4096)))  # as a decoder thread would
thread.start()
thread.join()
size_field = ctypes.c_size_t.from_address(blocks[0] - ctypes.sizeof(ctypes.c_size_t)).value
print("own arena" if size_field & 4 else "main arena")  # glibc's NON_MAIN_ARENA bit
"""

TRIM_PROBE = """
import ctypes
from videoindex.memory import trim_heap

def anon_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(3200)]  # 200 MiB of heap blocks under the mmap threshold
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
for block in blocks[:-1]:  # the last one stays in use at the top, so free() alone cannot shrink the heap
    libc.free(block)
held = anon_mib()
trimmed = trim_heap() if TRIM else False
print(held, anon_mib(), trimmed)
"""


def _run(code: str, extra_env: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", code], env=env | (extra_env or {}), capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_decode_worker_env_puts_every_thread_in_one_arena() -> None:
    """A freed frame buffer is reused by the next video whatever thread decodes it."""
    assert _run(ARENA_PROBE) == "own arena"  # glibc's default: the control
    assert _run(ARENA_PROBE, DECODE_WORKER_ENV) == "main arena"


def test_trim_heap_returns_freed_pages_to_the_os() -> None:
    """What a model actor frees during a shard goes back to the OS once the shard is done."""
    held, after, trimmed = _run("TRIM = False" + TRIM_PROBE).split()  # the control keeps it
    assert float(held) > 150 and float(after) > float(held) - 10 and trimmed == "False"
    held, after, trimmed = _run("TRIM = True" + TRIM_PROBE).split()
    assert float(held) > 150 and float(after) < float(held) - 150 and trimmed == "True"
