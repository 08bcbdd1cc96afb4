"""Data stages: image reading, ingest, split."""
