"""`videoindex status OUTPUT`: where a job stands, from the output directory alone.

Reads ``_job.json``, one listing of ``_ledger/`` and the committed shards' stats, so it works while the
job runs, after it, and after the driver died, on local and object-store outputs.
"""

from __future__ import annotations

from typing import Any

from videoindex import storage
from videoindex.format.jobrecord import read_job
from videoindex.format.ledger import Ledger, committed_totals


def job_status(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    fs, root = storage.filesystem(output, storage_options)
    record = read_job(fs, root)
    if record is None:
        raise FileNotFoundError(
            f"{output} has no _job.json: not a videoindex output (or the job never started)"
        )
    ledger = Ledger(fs, root)
    view = ledger.view()
    total = int(record["plan"]["shards"])
    counts = {"committed": 0, "running": 0, "failed": 0}
    for shard in range(total):
        state = view.state(shard).status
        if state in counts:
            counts[state] += 1
    counts["pending"] = total - sum(counts.values())
    stats = ledger.committed_stats()
    attempts = ledger.attempt_records()
    totals, busy = committed_totals(stats)
    rate = totals["clips"] / busy if busy > 0 else None
    shard_rate = len(stats) / busy if busy > 0 else None
    remaining = counts["pending"] + counts["running"]
    return {
        "output": output,
        "model": record["model"]["tag"],
        "random_weights": record["model"]["random_weights"],
        "videos_planned": record["plan"]["videos"],
        "shards": {"total": total, **counts},
        **totals,
        "clips_per_s": round(rate, 3) if rate else None,
        "eta_s": round(remaining / shard_rate, 1)
        if shard_rate and remaining
        else (0 if not remaining else None),
        "failures": [
            {"shard": a["shard"], "attempt": a["attempt"], "reason": a.get("reason")}
            for a in attempts
            if a.get("event") == "failed"
        ],
        "attempts": len([a for a in attempts if a.get("event") == "started"]),
    }


def render_status(report: dict[str, Any]) -> str:
    shards = report["shards"]
    lines = [
        f"output   {report['output']}",
        f"model    {report['model']}" + ("   (RANDOM WEIGHTS)" if report["random_weights"] else ""),
        f"shards   {shards['committed']}/{shards['total']} committed, {shards['running']} running, "
        f"{shards['failed']} failed, {shards['pending']} pending  ({report['attempts']} attempts)",
        f"videos   {report['videos']}/{report['videos_planned']} done: {report['videos_ok']} ok, {report['videos_error']} error",
        f"clips    {report['clips']}"
        + (f"  ({report['clips_per_s']} clips/s)" if report["clips_per_s"] else ""),
    ]
    if report["eta_s"]:
        lines.append(f"eta      {report['eta_s']:.0f} s")
    for failure in report["failures"]:
        lines.append(f"failed   shard {failure['shard']} attempt {failure['attempt']}: {failure['reason']}")
    return "\n".join(lines)
