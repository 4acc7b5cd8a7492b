"""``lm-sleep paired``: two sets of continual runs, paired over the seeds both ran (reporting/paired.py).

    lm-sleep paired --a state/compare/default-5/sleep --b docs/results/issue13/default-5-8188c1b43e05/ewc \\
        --labels sleep ewc --out paired.json

Each side is one or more folders (every result.json under them; one method, one run per seed). Prints a
Markdown report; ``--out`` also writes it as JSON (atomically), ``--markdown`` as a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.errors import reporting_errors
from model.errors import ArgumentError
from reporting.paired import paired_markdown, paired_runs, side_runs, write_paired


@reporting_errors("lm-sleep paired")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lm-sleep paired", description="Pair two sets of continual runs over their "
                                 "common seeds: each side's final accuracy and forgetting with 95% intervals, and "
                                 "A - B with the interval of the per-seed differences.")
    ap.add_argument("--a", nargs="+", required=True, type=Path, metavar="DIR",
                    help="side A: folders (or result.json files) of one method's runs")
    ap.add_argument("--b", nargs="+", required=True, type=Path, metavar="DIR", help="side B, the same way")
    ap.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"),
                    help="names of the two sides in the report (default: their methods, or A and B)")
    ap.add_argument("--out", type=Path, default=None, help="also write the pairing as JSON here")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the Markdown report here")
    args = ap.parse_args(argv)
    a, b = side_runs(args.a, "--a"), side_runs(args.b, "--b")
    if args.labels is not None:
        labels = tuple(args.labels)
        if labels[0] == labels[1]:
            raise ArgumentError(f"--labels: the two sides need different names, got {labels[0]!r} twice")
    else:
        ma, mb = next(iter(a.values()))["method"], next(iter(b.values()))["method"]
        labels = (ma, mb) if ma != mb else ("A", "B")
    report = paired_runs(a, b, labels)
    text = paired_markdown(report)
    write_paired(report, text, args.out, args.markdown)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
