#!/usr/bin/env python3
"""Write the demo/benchmark sample dataset as CSV (see kappa.datagen)."""

import argparse

from kappa.datagen import sample_frame


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
