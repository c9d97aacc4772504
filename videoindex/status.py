"""`videoindex status OUTPUT`: where a job stands, from the output directory alone.

Reads ``_job.json``, the ledger (its latest checkpoint and the log entries after it) and the latest run's
record, so it works while the job runs, after it, and after the driver died, on local and object-store
outputs, in a bounded number of requests. Liveness comes from heartbeats: a running shard attempt renews
its record every ``execution.heartbeat_s`` and the driver renews the run's; one older than
``STALLED_AFTER`` intervals is stalled, and a run whose driver stopped renewing is not running any more.
"""

from __future__ import annotations

import time
from typing import Any

from videoindex import storage
from videoindex.format.jobrecord import describe_changes, generation_fields, generations, read_job
from videoindex.format.ledger import STALLED_AFTER, Ledger, committed_totals

DEFAULT_HEARTBEAT_S = 30.0


def _job_state(run: dict[str, Any] | None, now: float) -> dict[str, Any]:
    if run is None:
        return {"state": "not started", "run": None}
    interval = float(run.get("heartbeat_s") or DEFAULT_HEARTBEAT_S)
    age = now - float(run.get("heartbeat_at") or run.get("started_at") or now)
    if run.get("finished_at"):
        state = "finished"
    else:
        state = "running" if age <= STALLED_AFTER * interval else "not running"
    job = {"state": state, "run": run.get("run"), "started_at": run.get("started_at"),
           "finished_at": run.get("finished_at"), "last_heartbeat_s": round(age, 1), "heartbeat_s": interval}  # fmt: skip
    return job


def _outdated(record: dict[str, Any], view: Any) -> set[int]:
    """Shards an update touched after their commit (the job record lists each update's shards): their
    rows are from before the update until a run re-indexes them."""
    found: set[int] = set()
    for entry in generations(record):
        for shard in entry.get("shards") or ():
            if view.state(int(shard)).generation < int(entry["generation"]):
                found.add(int(shard))
    return found


def job_status(
    output: str, storage_options: dict[str, Any] | None = None, *, now: float | None = None
) -> dict[str, Any]:
    fs, root = storage.filesystem(output, storage_options)
    record = read_job(fs, root)
    if record is None:
        raise FileNotFoundError(
            f"{output} has no _job.json: not a videoindex output (or the job never started)"
        )
    now = time.time() if now is None else now
    ledger = Ledger(fs, root)
    view = ledger.view()
    run = ledger.latest_run()
    total = int(record["plan"]["shards"])
    interval = float((run or {}).get("heartbeat_s") or DEFAULT_HEARTBEAT_S)
    running = []
    for shard, state in sorted(view.running().items()):
        age = state.heartbeat_age(now)
        running.append({"shard": shard, "attempt": state.running.get("attempt"), "node": state.running.get("node"),
                        "pid": state.running.get("pid"), "started_at": state.running.get("started_at"),
                        "heartbeat_s_ago": round(age, 1), "stalled": age > STALLED_AFTER * interval})  # fmt: skip
    stalled = {r["shard"] for r in running if r["stalled"]}
    outdated = _outdated(record, view)
    counts = {"committed": 0, "running": 0, "stalled": 0, "failed": 0}
    for shard in range(total):
        status = view.state(shard).status
        status = "stalled" if status == "running" and shard in stalled else status
        if status in counts and not (status == "committed" and shard in outdated):
            counts[status] += 1
    counts["pending"] = total - sum(counts.values())
    counts["pending_update"] = sum(1 for s in outdated if view.state(s).status == "committed")
    stats = view.committed_counts()
    totals, _ = committed_totals(stats)
    # Rates from this run's commits: an updated index's first commits are from an earlier run, maybe months ago.
    since = float((run or {}).get("started_at") or 0)
    recent = [s for s in stats if float(s.get("started_at", 0)) >= since]
    recent_totals, busy = committed_totals(recent)
    rate = recent_totals["clips"] / busy if busy > 0 else None
    shard_rate = len(recent) / busy if busy > 0 else None
    remaining = total - counts["committed"]
    job = _job_state(run, now)
    if remaining and job["state"] != "running":
        job["continue_with"] = f"videoindex resume {output}"
    return {
        "output": output,
        "model": record["model"]["tag"],
        "random_weights": record["model"]["random_weights"],
        "videos_planned": record["plan"]["videos"],
        **generation_fields(record),
        "job": job,
        "shards": {"total": total, **counts},
        **totals,
        "clips_per_s": round(rate, 3) if rate else None,
        "eta_s": round(remaining / shard_rate, 1)
        if shard_rate and remaining and job["state"] == "running"
        else (0 if not remaining else None),  # fmt: skip
        "running": running,
        "failures": [
            {
                "shard": s,
                "attempts": st.attempts,
                "failed_attempts": st.failed_attempts,
                "reason": st.last_failure,
            }
            for s, st in sorted(view.shards.items())
            if st.failed_attempts
        ],  # fmt: skip
        "attempts": sum(st.attempts for st in view.shards.values()),
    }


def render_status(report: dict[str, Any]) -> str:
    shards, job = report["shards"], report["job"]
    state = job["state"]
    if state in ("running", "not running") and job.get("last_heartbeat_s") is not None:
        state += f" (driver's last heartbeat {job['last_heartbeat_s']:.0f} s ago)"
    lines = [
        f"output   {report['output']}",
        f"model    {report['model']}" + ("   (RANDOM WEIGHTS)" if report["random_weights"] else ""),
        f"job      {state}",
        f"index    generation {report['generation']}"
        + (
            f", last update {report['last_update']} ({describe_changes(report['last_update_counts'])})"
            if report["last_update"]
            else ", never updated"
        ),
        f"shards   {shards['committed']}/{shards['total']} committed, {shards['running']} running, "
        f"{shards['stalled']} stalled, {shards['failed']} failed, {shards['pending']} pending"
        + (
            f" ({shards['pending_update']} of them waiting for the last update)"
            if shards["pending_update"]
            else ""
        )
        + "  "
        f"({report['attempts']} attempts)",
        f"videos   {report['videos']}/{report['videos_planned']} done: {report['videos_ok']} ok, {report['videos_error']} error",
        f"clips    {report['clips']}"
        + (f"  ({report['clips_per_s']} clips/s)" if report["clips_per_s"] else ""),
    ]
    if report["eta_s"]:
        lines.append(f"eta      {report['eta_s']:.0f} s")
    for r in report["running"]:
        what = "STALLED" if r["stalled"] else "running"
        lines.append(f"{what:<8} shard {r['shard']} attempt {r['attempt']} on {r['node']} (pid {r['pid']}), "
                     f"last heartbeat {r['heartbeat_s_ago']:.0f} s ago")  # fmt: skip
    for failure in report["failures"]:
        lines.append(f"failed   shard {failure['shard']}: {failure['failed_attempts']} failed attempt(s), "
                     f"last: {failure['reason']}")  # fmt: skip
    if report["job"].get("continue_with"):
        lines.append(f"the job is not running; continue it with: {report['job']['continue_with']}")
    return "\n".join(lines)
