"""Process memory of decode workers and model actors: caps and allocator settings (Linux, glibc).

A worker runs for hundreds of tasks or shards, so what its allocator keeps matters as much as what a
single decode needs. Plain functions on the calling process; Ray is not involved.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from collections.abc import Iterator


def private_memory_bytes() -> int | None:
    """This process's private writable memory (VmData: what RLIMIT_DATA limits); None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_cap(max_mb: int) -> Iterator[None]:
    """Let this process grow its private memory by at most ``max_mb`` MiB while the block runs (Linux).

    RLIMIT_DATA counts private writable memory (heap, malloc and anonymous mmap) but not the shared
    object store Ray maps into every worker, so it limits the decode's own allocations: past it numpy and
    PyAV raise MemoryError, torch "can't allocate memory", all classified out_of_memory, and the worker
    survives (checked in Ray workers). ``max_mb <= 0`` disables the cap. The old limit comes back after.
    """
    used = private_memory_bytes()
    if max_mb <= 0 or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + max_mb * 2**20
    cap = min(c for c in (cap, soft, hard) if c != resource.RLIM_INFINITY)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


# One malloc arena per decode worker. A Ray worker has dozens of threads, each with its own glibc arena;
# frame buffers freed in one arena are reused by that arena only, so a long-lived worker's heap crept
# video after video (figures: benchmarks/README.md, bench_memory). glibc reads it only when a process
# starts, so it is set in a decode worker's environment (Ray: the decode task's runtime_env, where it replaces
# a job-level value of the key; local executor: the worker process's environment).
DECODE_WORKER_ENV: dict[str, str] = {"MALLOC_ARENA_MAX": "1"}


def trim_heap() -> bool:
    """Give the allocator's free pages back to the OS (glibc malloc_trim; False elsewhere or if none).

    A model actor frees a shard's clips, tensors and tables when the shard ends, but glibc keeps the
    pages in its arenas, so the actor's memory crept up shard after shard; one trim per shard attempt
    costs far less than the shard (figures: benchmarks/README.md, bench_memory).
    """
    if sys.platform != "linux":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
