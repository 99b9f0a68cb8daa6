"""Would more validation queries have let calibration choose better? Calibrate a cell's pool again with other
settings (more users and queries) and the rules given.

At 128 validation queries calibration could not separate `act-loss3` from `act-cat` on the demo (benchmarks/
README.md). This derives a run on each cell's pool (same task model, sharers and keys) with the given
`calibration` settings, calibrates it, and reports each rule's validation metric, its paired comparison with
the best, its value on the kept cell's targets, the choice, and the choice among the default grid's rules only.
`--statistic likelihood` scores each rule by each validation query's output loss instead of its answer
(`calibration.statistic`), on the same validation queries when the other settings are the kept cell's.
Nothing new is benched on the targets; `choice_policy.py --probe LABEL` scores the choices there.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/calibration_power.py --out /work/runs/evidence --cells demo/0 \
        --queries 384 --max-users 32 --items 64 --label grid-q384 \
        --rules average act-cat act-top1 act-linear act-cat-half act-cat-tau4 act-cat-tau16 act-loss3 paper
"""

from __future__ import annotations

import argparse
from pathlib import Path

from filelock import FileLock

from perpcs.calibration import MEASURED, choose
from perpcs.pipeline import Run
from perpcs.rules import GRID
from perpcs.utils import read_json, write_json


def probe(src: Path, folder: Path, calibration: dict, kept: Path) -> dict:
    """The calibration's choice and candidates; the choice among the default grid's rules only (`chosen_in_grid`,
    from the same predictions), where the probe also scored opt-in rules; and, from the kept cell's bench, each
    rule's value on the targets (what the choice would have given them)."""
    old = Run(src)
    config = old.config.updated({"calibration": calibration})
    run = Run(folder) if (folder / "run.json").exists() else old.derive(folder, config)
    cal = run.calibrate()
    bench = read_json(kept / "results.json") if (kept / "results.json").exists() else {"methods": {}}
    metric = bench["primary_metric"]["name"] if cal["metric"] == "loss" else cal["metric"]  # the targets have no loss
    targets = {"none" if n == "non_personalized" else n: r["metrics"].get(metric) for n, r in bench["methods"].items()}
    statistic = cal.get("statistic", "metric")  # calibrations before the setting scored answers
    in_grid = {n: p for n, p in cal[MEASURED[statistic]].items() if n in GRID}  # dict order: simpler rules first
    grid_choice = choose(run.data.task, cal["golds"], in_grid, statistic, cal["alpha"], run.config.seed)
    return {"queries": cal["validation"]["queries"], "users": len(cal["validation"]["users"]),
            "context_items_mean": cal["validation"]["context_items_mean"],
            "chosen": cal["chosen"], "best": cal["best"], "tied_with_best": cal["tied_with_best"],
            "chosen_in_grid": grid_choice["chosen"],
            "metric": cal["metric"], "seconds": cal["cost"]["seconds"],
            "rules": {n: {"value": c["metrics"][cal["metric"]], "vs_none_p_holm": c.get("vs_none", {}).get("p_holm"),
                          "vs_best": c.get("vs_best"),
                          "targets": targets.get(n)}
                      for n, c in cal["candidates"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the suite's run folders (as evidence.py)")
    ap.add_argument("--cells", nargs="+", required=True, help="SET/SEED, e.g. demo/0")
    ap.add_argument("--queries", type=int, default=384)
    ap.add_argument("--rules", nargs="+", default=["act-cat", "act-loss3"])
    ap.add_argument("--max-users", type=int, default=16, help="calibration.max_users (more users, more queries)")
    ap.add_argument("--items", type=int, default=32, help="calibration.items: queries per validation user at most")
    ap.add_argument("--statistic", choices=["metric", "likelihood"], default="metric",
                    help="calibration.statistic: score rules by their answers or by each query's output loss")
    ap.add_argument("--label", help="names the probe's run folders and results rows (default: q<queries>); one label "
                                    "per settings, since a probe's folder is reused as it is")
    ap.add_argument("--kept", type=Path, default=Path(__file__).parent / "results" / "evidence",
                    help="the kept cells, whose benches give each rule's value on the targets")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "calibration-power.json")
    a = ap.parse_args()
    label = a.label or f"q{a.queries}"
    for cell in a.cells:
        name, seed = cell.split("/")
        src = a.out / name / f"seed-{seed}" / "run"
        row = probe(src, a.out / name / f"seed-{seed}-{label}" / "run",
                    {"queries": a.queries, "rules": a.rules, "max_users": a.max_users, "items": a.items,
                     "statistic": a.statistic},
                    a.kept / f"{name}-seed{seed}")
        with FileLock(a.out / "calibration-power.lock"):  # one results file, several workers
            results = read_json(a.results) if a.results.exists() else {}
            results[f"{cell} {label}"] = row
            write_json(a.results, results)
        print(f"{cell}: {row['queries']} validation queries from {row['users']} users "
              f"({row['context_items_mean']:.1f} history items each): chose {row['chosen']} ({row['chosen_in_grid']} "
              f"of the default grid), best "
              f"{row['best']}; " + ", ".join(f"{n} {r['value']:.3f}" + (f" (vs best p={r['vs_best']['p']:.2g})"
                                                                          if r["vs_best"] else "")
                                             for n, r in row["rules"].items()) + f"; wrote {a.results}", flush=True)


if __name__ == "__main__":
    main()
