"""SVD throughput per weight shape and route: a script front for ``specan bench``.

Same measurements as ``specan bench`` (``specan/bench.py``: every route of ``specan_kernels`` per
shape, beside the per-matrix ``torch.linalg.svd`` / ``svdvals`` loops, and randomized top-k
against scikit-learn and ``torch.svd_lowrank``), for running from a checkout:

    python benchmarks/bench_svd.py [--quick] [--shapes 3072x768,50304x768] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

from specan.bench import BenchOptions, run, table_lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", help="comma-separated shape names or BxMxN")
    parser.add_argument("--spectrum", default="random", help="random or decaying")
    parser.add_argument("--no-randomized", action="store_true", help="skip the top-k comparison")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (best of)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    opts = BenchOptions(
        device=args.device,
        shapes=args.shapes.split(",") if args.shapes else None,
        quick=args.quick,
        repeats=args.repeats,
        randomized=not args.no_randomized,
        spectrum=args.spectrum,
    )
    result = run(opts, progress=lambda msg: print(f"bench {msg}", file=sys.stderr))
    print("\n".join(table_lines(result)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
