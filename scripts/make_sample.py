#!/usr/bin/env python3
"""Write the demo sample dataset as CSV: the test suite's generator (tests/datagen.py), with its
awkward keys and values."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/ is not installed

from tests.datagen import sample_frame  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--out", default="sample.csv")
    args = parser.parse_args()
    sample_frame(args.rows, args.keys).to_csv(args.out, index=False)
    print(f"wrote {args.rows:,} rows over {args.keys:,} keys to {args.out}")


if __name__ == "__main__":
    main()
