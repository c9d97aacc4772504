"""`videoindex status OUTPUT`: where a job stands, from the output directory alone.

Reads ``_job.json``, one listing of ``_ledger/`` and the committed shards' stats, so it works while the
job runs, after it, and after the driver died, on local and object-store outputs.
"""

from __future__ import annotations

from typing import Any

from videoindex import storage
from videoindex.jobfile import read_job
from videoindex.ledger import Ledger

TOTAL_KEYS = ("videos", "videos_ok", "videos_error", "clips")


def committed_totals(stats: list[dict[str, Any]]) -> tuple[dict[str, int], float]:
    """Video/clip totals over committed shards' markers, and the wall seconds those shards spanned."""
    totals = {k: sum(int(s.get(k, 0)) for s in stats) for k in TOTAL_KEYS}
    spans = [(s["started_at"], s["finished_at"]) for s in stats if "started_at" in s]
    busy = max(e for _, e in spans) - min(b for b, _ in spans) if spans else 0.0
    return totals, busy


def summarize(ledger: Ledger) -> dict[str, Any]:
    """A finished run's totals, from the committed shards' markers alone."""
    totals, busy = committed_totals(ledger.committed_stats())
    view = ledger.view()
    return {
        **totals,
        "shards_committed": len(view.committed()),
        "shards_failed": len(view.failed()),
        "clips_per_s": round(totals["clips"] / busy, 3) if busy > 0 else None,
    }


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
