"""The output format: layout, schemas, ledger, job record, plan and table files.

What every reader (status, query, report, Spark, DuckDB) and every writer (the job) shares. No torch and
no decoder is imported here or below: a reader of an index loads only pyarrow, fsspec and this package.
"""

from videoindex.format.errortypes import ERROR_TYPES, RETRYABLE_ERROR_TYPES
from videoindex.format.jobrecord import JobMismatchError, read_job
from videoindex.format.layout import JOB_FILE, PLAN_FILE, SCHEMA_VERSION, TABLES, shard_name, table_file
from videoindex.format.ledger import Ledger, LedgerView
from videoindex.format.plans import VideoTask, read_plan
from videoindex.format.schemas import ERRORS_SCHEMA, PLAN_SCHEMA, VIDEOS_SCHEMA, clips_schema

__all__ = [
    "ERRORS_SCHEMA", "ERROR_TYPES", "JOB_FILE", "PLAN_FILE", "PLAN_SCHEMA", "RETRYABLE_ERROR_TYPES",
    "SCHEMA_VERSION", "TABLES", "VIDEOS_SCHEMA", "JobMismatchError", "Ledger", "LedgerView", "VideoTask",
    "clips_schema", "read_job", "read_plan", "shard_name", "table_file",
]  # fmt: skip
