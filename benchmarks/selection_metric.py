"""Would calibration choose better on classification by accuracy (the primary metric) than by macro-F1?

The issue asks calibration to pick by the task's primary metric, with macro-F1 "as well, or as the tie-break" so
that a rule answering one label for every query cannot win by class balance; calibration selects classification
by macro-F1 alone (paired bootstrap), which with many classes and 128 queries is a noisy statistic. This reads
each classification cell's kept validation answers (RUN/calibration.json, no model runs) and makes calibration's
decision again with accuracy per query and the sign test (Holm against none, then the earliest rule the test
cannot tell from the best, as `calibration.choose_rule` does for ratings), and scores both choices on the cell's
targets (its kept results.json, where every grid rule ran).

    python benchmarks/selection_metric.py --cells /work/runs/evidence/demo/seed-0:results/evidence/demo-seed0 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perpcs.calibration import holm
from perpcs.evaluation import per_query
from perpcs.pipeline import Run
from perpcs.stats import paired
from perpcs.utils import read_json, write_json

ROOT = Path(__file__).resolve().parent


def by_accuracy(task, cal: dict, alpha: float) -> tuple[str, list[str]]:
    """(chosen, tied with the best) on the validation answers, by accuracy and the sign test."""
    acc = {n: per_query(task, cal["golds"], p) for n, p in cal["predictions"].items() if n in cal["grid"]}
    vs_none = {n: paired(a, acc["none"], True) for n, a in acc.items() if n != "none"}
    adjusted = holm({n: c["p"] for n, c in vs_none.items()})
    better = [n for n in acc if n != "none" and vs_none[n]["diff"] > 0 and adjusted[n] < alpha]
    if not better:
        return "none", []
    mean = {n: sum(acc[n].values()) / len(acc[n]) for n in better}
    best = max(better, key=lambda n: (mean[n], -better.index(n)))
    tied = [n for n in better if n == best or paired(acc[n], acc[best], True)["p"] >= alpha]
    return tied[0], tied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", required=True, metavar="SEED_FOLDER:KEPT",
                    help="a cell's seed folder (holding run/) and its kept results folder, joined by ':'")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "selection-metric.json")
    a = ap.parse_args()
    rows = []
    for cell in a.cells:
        folder, kept = (Path(p) for p in cell.split(":"))
        run = Run(folder / "run")
        cal = read_json(run.calibration_path)
        methods = read_json(kept / "results.json")["methods"]

        def targets(rule: str) -> float:
            return methods["non_personalized" if rule == "none" else rule]["metrics"]["accuracy"]

        chosen, tied = by_accuracy(run.data.task, cal, cal["alpha"])
        oracle = max((n for n in cal["grid"] if ("non_personalized" if n == "none" else n) in methods), key=targets)
        rows.append({"cell": str(kept), "by_f1": cal["chosen"], "by_f1_targets": targets(cal["chosen"]),
                     "by_accuracy": chosen, "tied_by_accuracy": tied, "by_accuracy_targets": targets(chosen),
                     "targets_best": oracle, "targets_best_accuracy": targets(oracle)})
        r = rows[-1]
        print(f"{kept.name}: macro-F1 chose {r['by_f1']} ({r['by_f1_targets']:.3f} on the targets), accuracy "
              f"{chosen} ({r['by_accuracy_targets']:.3f}); the targets' best {oracle} "
              f"({r['targets_best_accuracy']:.3f})", flush=True)
    write_json(a.results, rows)
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
