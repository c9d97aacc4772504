"""Bookkeeping at scale: seconds (local disk) and requests (moto S3) of each reader against the shard count.

    .venv/bin/python benchmarks/bench_bookkeeping.py [--shards 1000 10000 100000] [--moto-shards 1000 5000]
                                                     [--heavy-up-to 10000] [--ledger-only 100000 1000000]

Builds synthetic indexes (tests/synthetic_index.py: real layout, schemas, ledger log and a final
checkpoint, as a finished job leaves them; one video of two clips per shard, 2% failed videos) and times
each operation once, in this process, on a freshly opened index: ``status``, ``query summary``,
``labels``, ``errors``, ``search`` and ``similar`` (these two scan the clips table: run up to
``--heavy-up-to`` shards), the report, the bookkeeping of a resume with nothing to do (the ledger
view, the plan and the queue: everything a real resume does before it would load the model), a scan of
the videos table and the failed-video scan of ``resume --retry-failed``; each index as built, then after
``videoindex compact`` (its own cost in the second row). On moto
every request is counted at a proxy in front of the server. ``--ledger-only`` times status, query summary
and a no-op resume on the ledger a finished job of that many shards leaves (the states and stats of a 10-shard
synthetic index repeated into one checkpoint), without writing table files: minutes instead of hours.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.s3server import FlakyProxy, moto_server, s3_options  # noqa: E402
from tests.synthetic_index import write_synthetic_index  # noqa: E402
from videoindex import storage  # noqa: E402
from videoindex.format.compaction import CompactionResult, compact  # noqa: E402
from videoindex.format.ledger import Ledger, LedgerView  # noqa: E402
from videoindex.format.plans import read_plan, write_plan  # noqa: E402
from videoindex.job.resume import failed_videos  # noqa: E402
from videoindex.job.run import outdated_videos  # noqa: E402
from videoindex.query import open_index  # noqa: E402
from videoindex.report import build_context  # noqa: E402
from videoindex.stages.plan import make_plan  # noqa: E402
from videoindex.status import job_status  # noqa: E402

HEAVY = ("search", "similar")


def _build(uri: str, shards: int, options: dict[str, Any] | None) -> dict[str, Any]:
    fs, root = storage.filesystem(uri, options)
    info = write_synthetic_index(root, fs=fs, videos=shards, clips_per_video=2, shards=shards,
                                 error_videos=max(1, shards // 50))  # fmt: skip
    rows = [{"uri": u, "size_bytes": None, "mtime": None, "extra": None} for u in sorted(info["uris"])]
    write_plan(fs, root, make_plan(rows, 1), 1)
    return info


def _resume_bookkeeping(uri: str, options: dict[str, Any] | None) -> int:
    fs, root = storage.filesystem(uri, options)
    view = Ledger(fs, root).view()
    plan = read_plan(fs, root)
    outdated = outdated_videos(plan, view)
    shards = int(storage.read_json(fs, storage.join(root, "_job.json"))["plan"]["shards"])
    committed = view.committed()
    return sum(1 for s in range(shards) if s not in committed or s in outdated)  # shards to run


def _retry_failed_scan(uri: str, options: dict[str, Any] | None) -> int:
    """What `resume --retry-failed` reads beyond the no-op: the failed videos of committed shards."""
    fs, root = storage.filesystem(uri, options)
    return sum(
        map(
            len,
            failed_videos(fs, root, Ledger(fs, root).view().committed_commits(), all_errors=True).values(),
        )
    )


def operations(
    uri: str, options: dict[str, Any] | None, info: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    vid = info["video_ids"][len(info["video_ids"]) // 2]
    return {
        "status": lambda: job_status(uri, options),
        "query summary": lambda: open_index(uri, options).summary(),
        "labels": lambda: open_index(uri, options).labels("clip", top=20),
        "errors": lambda: open_index(uri, options).errors(),
        "search": lambda: open_index(uri, options).search("pushing", limit=100),
        "similar": lambda: open_index(uri, options).similar(vid, k=10, clip_index=0),
        "report (no samples)": lambda: build_context(
            open_index(uri, options), sample_videos=0, neighbours=0, seed=0
        ),
        "resume (no-op)": lambda: _resume_bookkeeping(uri, options),
        "videos scan": lambda: open_index(uri, options).sql(
            "SELECT count(*) FROM videos WHERE status = 'error'"
        ),
        "retry-failed scan": lambda: _retry_failed_scan(uri, options),
    }


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = fn()
    return time.perf_counter() - started, result


def _compact(uri: str, options: dict[str, Any] | None) -> CompactionResult:
    return compact(*storage.filesystem(uri, options))


def local(shards: list[int], heavy_up_to: int) -> None:
    names = list(operations("", None, {"video_ids": [""]}))
    print("Local disk, seconds (each shard count as built, then after `videoindex compact`):\n")
    print("| shards | build or compact s | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for n in shards:
        with tempfile.TemporaryDirectory() as tmp:
            uri = str(Path(tmp) / "out")
            built, info = _timed(lambda n=n, uri=uri: _build(uri, n, None))
            for label in ("", " compacted"):
                if label:
                    built, _ = _timed(lambda uri=uri: _compact(uri, None))
                cells = []
                for name, fn in operations(uri, None, info).items():
                    if name in HEAVY and n > heavy_up_to:
                        cells.append("not run")
                        continue
                    seconds, result = _timed(fn)
                    if name == "resume (no-op)":
                        assert result == 0, result
                    cells.append(f"{seconds:.2f}")
                print(f"| {n:,}{label} | {built:.1f} | " + " | ".join(cells) + " |", flush=True)


def moto(shards: list[int], heavy_up_to: int) -> None:
    names = list(operations("", None, {"video_ids": [""]}))
    print("\nmoto S3 (local server), requests (seconds), as built and after `videoindex compact`:\n")
    print("| shards | compact | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    with moto_server() as server:
        admin = server.fs()
        admin.mkdir("bench")
        for n in shards:
            uri = f"s3://bench/n{n}"
            info = _build(uri, n, server.options())
            with FlakyProxy(server.url) as proxy:
                options = s3_options(proxy.url)
                for label in ("", " compacted"):
                    compacted = ""
                    if label:
                        before = proxy.requests
                        seconds, _ = _timed(lambda uri=uri, options=options: _compact(uri, options))
                        compacted = f"{proxy.requests - before} ({seconds:.1f} s)"
                    cells = []
                    for name, fn in operations(uri, options, info).items():
                        if name in HEAVY and n > heavy_up_to:
                            cells.append("not run")
                            continue
                        before = proxy.requests
                        seconds, _ = _timed(fn)
                        cells.append(f"{proxy.requests - before} ({seconds:.1f} s)")
                    print(f"| {n:,}{label} | {compacted} | " + " | ".join(cells) + " |", flush=True)


def _ledger_only(uri: str, shards: int) -> None:
    """A 10-shard synthetic index whose ledger checkpoint and _job.json then claim ``shards`` shards."""
    _build(uri, 10, None)
    fs, root = storage.filesystem(uri)
    ledger = Ledger(fs, root)
    small = ledger.view()
    big = LedgerView(position=small.position, last_key=small.last_key)
    for shard in range(shards):
        state = copy.copy(small.shards[shard % 10])
        state.shard, state.stats = shard, {**small.shards[shard % 10].stats, "shard": shard}
        big.shards[shard] = state
    for name in fs.ls(storage.join(root, "_ledger", "checkpoints")):
        fs.rm(name)
    ledger.write_checkpoint(big)
    job = storage.read_json(fs, storage.join(root, "_job.json"))
    job["plan"]["shards"] = shards
    storage.write_json(fs, storage.join(root, "_job.json"), job)


def ledger_only(shards: list[int]) -> None:
    print("\nLedger only (local disk), seconds:\n")
    print("| shards | build s | status | query summary | resume (no-op) |")
    print("|---|---|---|---|---|")
    for n in shards:
        with tempfile.TemporaryDirectory() as tmp:
            uri = str(Path(tmp) / "out")
            built, _ = _timed(lambda n=n, uri=uri: _ledger_only(uri, n))
            status_s, status = _timed(lambda uri=uri: job_status(uri))
            assert status["shards"]["committed"] == n, status["shards"]
            summary_s, summary = _timed(lambda uri=uri: open_index(uri).summary().to_pylist()[0])
            assert summary["shards_committed"] == n and summary["labels_seen"] > 0, summary
            resume_s, to_run = _timed(lambda uri=uri: _resume_bookkeeping(uri, None))
            assert to_run == 0, to_run
            print(f"| {n:,} | {built:.0f} | {status_s:.2f} | {summary_s:.2f} | {resume_s:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--moto-shards", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--heavy-up-to", type=int, default=10000)
    parser.add_argument("--ledger-only", type=int, nargs="*", default=[])
    args = parser.parse_args()
    if args.shards:
        local(args.shards, args.heavy_up_to)
    if args.moto_shards:
        moto(args.moto_shards, args.heavy_up_to)
    if args.ledger_only:
        ledger_only(args.ledger_only)


if __name__ == "__main__":
    main()
