"""Snapshots: parts per partition, the one merge, atomic publishing, reading back."""
