"""A set's kept cells pooled, read the way the fresh-cell tests in benchmarks/README.md are written: the calibrated
default and every other row against NP on all queries, and on OPPU's queries the default, OPPU and the share of
OPPU's gain. Reads only the cells' scores.json and results.json (no model runs).

    python benchmarks/pooled_reading.py --set studemo --seeds 2 3 --results benchmarks/results/evidence-fresh
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from evidence import _pooled
from perpcs.stats import paired


def line(label: str, a: dict[str, float], b: dict[str, float], higher: bool) -> str:
    r = paired(a, b, higher)
    return (f"{label}: {mean(a[q] for q in b if q in a):.3f} against {mean(b[q] for q in a if q in b):.3f} on {r['n']} "
            f"queries, {r['diff']:+.3f} ({r['wins']} / {r['losses']}, p = {r['p']:.2g})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, help="the set's name in the cells' folder names (<set>-seed<n>)")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/evidence-fresh"))
    args = ap.parse_args(argv)
    first, rows = _pooled([args.results / f"{args.set}-seed{seed}" for seed in args.seeds])
    higher = first["primary_metric"]["higher_is_better"]
    base = rows["non_personalized"]
    for row in rows:
        if row != "non_personalized":
            print(line(f"{row} vs NP", rows[row], base, higher))
    if "oppu" in rows:
        on = set(rows["oppu"])
        np_, me, op = (mean(rows[r][q] for q in on) for r in ("non_personalized", "perpcs", "oppu"))
        print(line("on OPPU's queries, perpcs vs NP", {q: rows["perpcs"][q] for q in on}, base, higher))
        gain = (op - np_) if higher else (np_ - op)
        share = ((me - np_) if higher else (np_ - me)) / gain if gain > 0 else None
        print(f"on OPPU's queries: NP {np_:.3f}, perpcs {me:.3f}, OPPU {op:.3f}; share of OPPU's gain: "
              f"{'none (OPPU no better than NP)' if share is None else f'{share:.0%}'}")


if __name__ == "__main__":
    main()
