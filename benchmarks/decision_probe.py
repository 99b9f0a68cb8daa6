"""Calibration's decision made again from a cell's kept validation answers under another decision rule, both choices
scored on the cell's targets (no model runs).

`--rule accuracy`: classification selected by accuracy and the sign test instead of macro-F1 and its bootstrap
(the issue asks for the primary metric with macro-F1 as a guard; calibration uses macro-F1 alone, a noisy
statistic over 128 queries and many classes). Holm against none, then the earliest rule tied with the best, as
`calibration.choose_rule` does for ratings.
`--rule stepwise`: the same rules beat none as today, but instead of the earliest rule tied with the best, the
choice starts at the earliest of them and moves to a later rule only if that one is significantly better than the
current choice (calibration's own paired test). Why: today's tie is read against the best, so adding a candidate
that becomes the best can move the choice among the others; a stepwise choice is moved only by a rule that beats it.

    python benchmarks/decision_probe.py --rule stepwise \
        --cells /work/runs/evidence/demo/seed-0/run:benchmarks/results/evidence/demo-seed0 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perpcs.calibration import choose_rule, comparer
from perpcs.pipeline import Run
from perpcs.utils import read_json, write_json

ROOT = Path(__file__).resolve().parent


def by_accuracy(task, cal: dict, alpha: float) -> str:
    preds = {n: p for n, p in cal["predictions"].items() if n in cal["grid"]}
    return choose_rule(task, cal["golds"], preds, alpha, macro_f1=False)["chosen"]


def stepwise(task, cal: dict, alpha: float) -> str:
    preds = {n: p for n, p in cal["predictions"].items() if n in cal["grid"]}
    sign = 1 if cal["higher_is_better"] else -1
    better = [n for n in preds if n != "none" and sign * cal["candidates"][n]["vs_none"]["diff"] > 0
              and cal["candidates"][n]["vs_none"]["p_holm"] < alpha]
    if not better:
        return "none"
    compare, _ = comparer(task, cal["golds"], preds)
    chosen = better[0]
    for n in better[1:]:
        c = compare(n, chosen)
        if sign * c["diff"] > 0 and c["p"] < alpha:
            chosen = n
    return chosen


RULES = {"accuracy": by_accuracy, "stepwise": stepwise}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", choices=list(RULES), required=True)
    ap.add_argument("--cells", nargs="+", required=True, metavar="RUN:KEPT",
                    help="a calibrated run folder and the kept results folder of its cell, joined by ':'")
    ap.add_argument("--results", type=Path, help="default: results/decision-probe-RULE.json")
    a = ap.parse_args()
    out = a.results or ROOT / "results" / f"decision-probe-{a.rule}.json"
    rows = []
    for cell in a.cells:
        if cell.count(":") != 1:
            raise SystemExit(f"--cells {cell!r}: expected RUN:KEPT, a run folder and a kept results folder")
        folder, kept = (Path(p) for p in cell.split(":"))
        if not (folder / "calibration.json").is_file() or not (kept / "results.json").is_file():
            raise SystemExit(f"--cells {cell!r}: needs {folder / 'calibration.json'} and {kept / 'results.json'}")
        run = Run(folder)
        cal = read_json(run.calibration_path)
        res = read_json(kept / "results.json")
        primary = res["primary_metric"]["name"]

        def targets(rule: str) -> float:
            return res["methods"]["non_personalized" if rule == "none" else rule]["metrics"][primary]

        chosen = RULES[a.rule](run.data.task, cal, cal["alpha"])
        rows.append({"run": str(folder), "cell": str(kept), "grid": list(cal["grid"]), "today": cal["chosen"],
                     "today_targets": targets(cal["chosen"]), a.rule: chosen, "targets": targets(chosen)})
        print(f"{folder}: today {cal['chosen']} ({targets(cal['chosen']):.3f} {primary} on the targets), "
              f"{a.rule} {chosen} ({targets(chosen):.3f})", flush=True)
    write_json(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
