"""videoindex: index video collections with a VideoMAE classifier into Parquet tables, on Ray."""

__version__ = "0.1.0"


def open(output: str, storage_options: dict | None = None):  # noqa: A001 - `videoindex.open(OUTPUT)` is the API
    """The tables of an index as pyarrow datasets / DuckDB relations, with the query operations."""
    from videoindex.query import open_index

    return open_index(output, storage_options)
