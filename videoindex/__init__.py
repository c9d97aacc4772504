"""videoindex: index video collections with a VideoMAE classifier into Parquet tables, on Ray."""

__version__ = "0.1.0"
