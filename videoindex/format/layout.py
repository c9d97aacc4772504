"""Where everything lives under OUTPUT: the one place that names files, so every reader and writer agrees.

Layout (all names derive from the shard id and its files' version, so a re-run never duplicates)::

    _job.json                                 settings, model, label map, versions
    _plan/plan.parquet                        uri, video_id, size, mtime, shard (sorted by shard, uri)
    _plan/plan-00003.parquet                  the plan after update 3 (`run --update`; _job.json names it)
    clips/shard=00042/part-00042.parquet      one row per clip
    videos/shard=00042/part-00042.parquet     one row per input video
    errors/shard=00042/part-00042.parquet     one row per error met (also non-fatal ones)
    clips/shard=00042/part-00042-v0003.parquet   the shard rewritten by its attempt 3 (an update, a retry
                                              of failed videos, --rerun): the commit names the version
    _ledger/log/{run}-{seq}.s00042.a01.committed.json   commit event + shard stats, written last
    _ledger/checkpoints/{position}.parquet    every shard's settled state (format/ledger.py)

``shard`` is a Hive partition column (not stored inside the files), so
``pyarrow.dataset.dataset(OUTPUT + "/clips", partitioning="hive")`` and DuckDB's ``hive_partitioning``
give it back as an integer. Such a plain read of the folders is exact for a finished job with no rewrite
under way or left unfinished; readers that follow the ledger (``videoindex.query``) always are.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1
TABLES = ("clips", "videos", "errors")
SHARD_WIDTH = 5
JOB_FILE = "_job.json"
PLAN_FILE = "_plan/plan.parquet"
LEDGER_DIR = "_ledger"


def plan_file(generation: int) -> str:
    """The plan of a generation, relative to OUTPUT: the first plan keeps its name, each update adds one."""
    return PLAN_FILE if generation == 0 else f"_plan/plan-{generation:05d}.parquet"


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_WIDTH}d}"


def table_file(table: str, shard: int, version: int = 0) -> str:
    """Path of a shard's file, relative to OUTPUT. A shard's first files are version 0; an attempt that
    rewrites a committed shard writes its files as version = its attempt number beside the committed ones,
    commits (the commit event names the version), then deletes the files it supersedes. Readers read the
    committed version's files, so they see a shard's old rows or its new rows, whole, never a mix."""
    name = shard_name(shard)
    suffix = f"-v{version:04d}" if version else ""
    return f"{table}/shard={name}/part-{name}{suffix}.parquet"


_PART = re.compile(r"^part-\d+(?:-v(\d+))?\.parquet$")


def file_version(name: str) -> int | None:
    """The version of a shard's file from its name (``part-00042-v0003.parquet`` -> 3, no suffix -> 0);
    None for a name that is not a table file (temporary files, anything else)."""
    match = _PART.match(name)
    return None if match is None else int(match.group(1) or 0)


def table_dir(table: str, shard: int) -> str:
    """The partition folder that holds every version of a shard's file of ``table``."""
    return f"{table}/shard={shard_name(shard)}"
