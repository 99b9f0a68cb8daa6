"""Bring finished evidence cells up to today's rules, without benching them again.

A rule added to `rules.RULES` changes a cell in two rows only: the new rule's own (a fixed-rule variant) and,
if it joined the default grid (`rules.GRID`; an opt-in rule does not), the calibrated default's if calibration
now chooses otherwise. Every other row (non_personalized, OPPU,
PEFT retrieval, PriME, the older rules) reads the same task model, split, sharers and pool, and greedy
decoding makes it the same answers. So for each cell whose run folder is still on this machine
(OUT/<set>/seed-<n>/run), this derives a run on the same pool with the whole grid
(OUT/<set>/seed-<n>-refresh/run), calibrates it over the default grid carrying over the answers the cell's
calibration already made (`calibration.reusable`: only new grid rules are scored on the validation users), and benches
non_personalized (a check: its answers must equal the cell's), each new rule, and, if the choice changed, the
calibrated default with its OPPU/assembly costs timed again. The kept cell
(benchmarks/results/evidence/<set>-seed<n>/) then gets those rows in scores.json and results.json, the new
calibration, refresh.json (what changed and from where) and refresh.md (the refresh bench's own table).

A grid change is tested the same way in a copy of the kept cells: `--candidates RULE ...` has calibration choose
from the default grid plus those opt-in rules (`--calibrate-only`: no rows for missing rules).

Resumable like the suite: a kept cell with a row for every rule, calibrated over the grid, is skipped, and a worker
skips a cell another holds. A cell whose run folder is gone (run folders do not outlive the machine) is reported
and left as it is, or with --rebuild built again: its data and the pipeline up to calibration with the cell's own
settings (a pool check's derived from its source cell's run, rebuilt first). The seed makes it the same run: the
refresh then stops unless calibration chooses as the kept cell's did and non_personalized answers as it did.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/grid_refresh.py [--cells demo/0 studemo/1 ...] [--out runs/evidence]
        [--rebuild [--data-root ../shared/data]] [--candidates task-cat --calibrate-only --results COPY]
    python benchmarks/evidence.py --summary-only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from filelock import FileLock, Timeout

from evidence import ALL, POOL_CHECKS, RESULTS, SETS, make_data, seeds_of
from perpcs.bench import BenchSettings, bench
from perpcs.neighbours import NeighbourTable
from perpcs.pipeline import Run
from perpcs.report import folder_scores
from perpcs.rules import GRID, RULES
from perpcs.settings import RunConfig
from perpcs.utils import read_json, write_json, write_text


def todo(res: dict, grid: list[str]) -> tuple[list[str], list[str]]:
    """(rules the cell has no row for, or whose definition changed since its calibration scored them; rules of
    `grid` its calibration has not scored as they are today)."""
    scored = res["calibration"]["grid"]
    rows = [n for n in RULES if n != "none" and (n not in res["methods"] or scored.get(n, RULES[n]) != RULES[n])]
    return rows, [n for n in grid if scored.get(n) != RULES[n]]


def with_candidates(extra: list[str]) -> list[str]:
    """The default grid plus `extra` rules, in `RULES` order (simpler first, as calibration's ties read it)."""
    unknown = [n for n in extra if n not in RULES]
    if unknown:
        raise SystemExit(f"--candidates: no rule {unknown[0]!r}; rules: {', '.join(RULES)}")
    return [n for n in RULES if n in GRID or n in extra]


def rebuild(name: str, seed: int, out: Path, data_root: Path) -> Run:
    """The cell's run folder again, up to calibration: what `evidence.py` benched, without the bench's methods."""
    source, changed = POOL_CHECKS.get(name, (name, {}))
    _, data_args, fields = SETS[source]
    data = out / source / f"data-{seed}"
    make_data(data_args, data_root, data, seed)
    config = RunConfig(data=str(data), seed=seed, **fields).updated(changed)
    folder = out / name / f"seed-{seed}" / "run"
    print(f"cell {name} seed {seed}: rebuild its run folder {folder}", flush=True)
    if changed and not (folder / "run.json").exists():
        run = rebuild(source, seed, out, data_root).derive(folder, config)
    else:
        run = Run.create(folder, config)
    run.task_adapt()
    run.select()
    run.build_pool()
    run.calibrate()
    return run


def refresh_cell(name: str, seed: int, out: Path, results: Path = RESULTS,
                 data_root: Path | None = None, grid: list[str] = list(GRID), rows: bool = True) -> Path | None:
    """`grid`: the rules calibration chooses from (the default grid, or more with --candidates); `rows`: bench the
    rules the cell has no row for (without it, only calibration and, if its choice changes, the default's row)."""
    kept = results / f"{name}-seed{seed}"
    src = out / name / f"seed-{seed}" / "run"
    if not (kept / "results.json").exists():
        print(f"skip {name} seed {seed}: not in {results} (bench it with evidence.py)", flush=True)
        return None
    done = read_json(kept / "refresh.json") if (kept / "refresh.json").exists() else {}
    added, calibrated = todo(read_json(kept / "results.json"), grid)
    added = added if rows else []
    if not added and not calibrated:
        print(f"skip {name} seed {seed}: {kept} has a row for every rule, calibrated over {', '.join(grid)}",
              flush=True)
        return None
    if not (src / "calibration.json").exists():
        if data_root is None:
            print(f"skip {name} seed {seed}: its run folder {src} is gone; --rebuild builds it again", flush=True)
            return None
        rebuild(name, seed, out, data_root)
        if (was := read_json(kept / "results.json")["calibration"]["chosen"]) != read_json(src / "calibration.json")[
                "chosen"]:
            raise SystemExit(f"{name} seed {seed}: the rebuilt run's calibration chose otherwise than the kept cell's "
                             f"({was}); not the same run, not refreshed")
    # one folder per round of added rules or candidates, so a later round does not resume into an earlier one's
    suffix = "".join([f"-{'-'.join(added)}" if added else "", f"-grid-{'-'.join(calibrated)}" if calibrated else ""])
    folder = out / name / f"seed-{seed}-refresh{suffix if done else ''}"
    try:
        with FileLock(folder.with_name(folder.name + ".lock"), timeout=0):
            return _refresh(name, seed, src, folder, kept, added, done, grid)
    except Timeout:
        print(f"skip {name} seed {seed}: another worker holds it", flush=True)
        return None


def lend_table(run: Run, cell: Path, seed: int, grid: list[str]) -> None:
    """Copy into `run` a neighbour table an earlier refresh of the cell built (`perpcs.neighbours`): on the same pool
    it is the same table, and building it costs a generation per validation item and sharer. Calibration still
    checks its validation users; its cost stays with the refresh that built it. A table written before tables
    recorded their history budget takes it from the settings of the run that built it."""
    budgets = {run.config.updated(RULES[n]).assembly.recent_k for n in grid
               if RULES[n].get("assembly", {}).get("select") == "neighbours"}
    if len(budgets) != 1:  # no rule reads a table, or rules that read tables over different budgets
        return
    sharers = run.own_pool().sharers()
    for donor in sorted(cell.glob(f"seed-{seed}-refresh*/**/neighbours/neighbours.json")):
        table = NeighbourTable.from_pretrained(donor.parent)
        if table.items is None:
            table.items = Run(donor.parents[1]).config.assembly.recent_k
        if (table.sharers, table.items) == (sharers, *budgets):
            table.save_pretrained(run.neighbours_path)
            print(f"neighbour table lent from {donor.parent}", flush=True)
            return


def _refresh(name: str, seed: int, src: Path, folder: Path, kept: Path, added: list[str], done: dict,
             grid: list[str]) -> Path:
    """`done`: an earlier round's refresh.json, kept inside this one's (`earlier`), its refresh.md below this one's."""
    t0 = time.perf_counter()
    old = Run(src)
    before = read_json(old.calibration_path)
    config = old.config.updated({"calibration": {"rules": grid}})
    if not (folder / "run" / "run.json").exists():
        lend_table(old.derive(folder / "run", config), folder.parent, seed, grid)
    print(f"cell {name} seed {seed}: calibrate over {', '.join(grid)} into {folder / 'run'}", flush=True)
    after = Run(folder / "run").calibrate(scored=before)
    changed = after["chosen"] != before["chosen"]
    settings = BenchSettings(methods=["non_personalized", *(["perpcs"] if changed else [])],
                             variants={n: RULES[n] for n in added}, cost_targets=2 if changed else 0)
    if not (folder / "results.json").exists():
        bench(config.data, folder, config, settings)
    new = read_json(folder / "results.json")
    rows = [*added, *(["perpcs"] if changed else [])]
    scores, fresh = read_json(kept / "scores.json"), folder_scores(folder, new["dataset"], ["non_personalized", *rows])
    if fresh["non_personalized"] != scores["non_personalized"]:
        raise SystemExit(f"{name} seed {seed}: non_personalized answers differ from the kept cell's; not merged")
    res = read_json(kept / "results.json")
    for r in rows:
        scores[r] = fresh[r]
        res["methods"][r] = new["methods"][r]
    for v in added:
        res.setdefault("variants", {})[v] = new["variants"][v]
        res["mixing"][v] = new["mixing"][v]
    res["calibration"] = new["calibration"]
    if changed:
        res["alternating_costs"], res["mixing"]["perpcs"] = new["alternating_costs"], new["mixing"]["perpcs"]
    write_json(kept / "scores.json", scores)
    # compact: a kept cell carries every rule's per-target, per-layer mixing (Beauty's 70 targets passed 1 MiB indented)
    write_json(kept / "results.json", res, indent=None)
    write_text(kept / "refresh.md", f"# {name} seed {seed}: refreshed to the rules {', '.join(RULES)}, "
               f"calibrated over {', '.join(grid)}\n\n"
               f"Rows benched again: non_personalized (answers equal to the cell's), {', '.join(rows)}. "
               f"Calibration chose {before['chosen']} before and {after['chosen']} now.\n\n"
               + (folder / "results.md").read_text()
               + (f"\n\n---\n\n{(kept / 'refresh.md').read_text()}" if done else ""))
    write_json(kept / "refresh.json", {"grid": list(RULES), "calibrated_over": grid, "added": added, "rows": rows,
                                       "chosen_before": before["chosen"], "chosen_after": after["chosen"],
                                       "non_personalized_equal": True, "seconds": time.perf_counter() - t0,
                                       "calibration_cost": after["cost"], **({"earlier": done} if done else {})})
    print(f"cell {name} seed {seed}: {before['chosen']} -> {after['chosen']}; kept in {kept} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return kept


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the suite's run folders (as evidence.py)")
    ap.add_argument("--cells", nargs="*", help="SET/SEED, e.g. demo/0 (default: every cell, seed by seed)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the kept cells are (as evidence.py)")
    ap.add_argument("--rebuild", action="store_true", help="build a cell's run folder again if it is gone")
    ap.add_argument("--candidates", nargs="*", default=[], metavar="RULE",
                    help="opt-in rules calibration also chooses from (test a grid change in a copy of --results)")
    ap.add_argument("--calibrate-only", action="store_true",
                    help="bench no rows for rules a cell lacks: only calibrate, and bench the default if it changes")
    ap.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                    help="the real data sets (with --rebuild, as evidence.py)")
    a = ap.parse_args(argv)
    cells = ([(c.split("/")[0], int(c.split("/")[1])) for c in a.cells] if a.cells else
             [(n, s) for i in range(3) for n in ALL for s in seeds_of(n)[i:i + 1]])
    grid = with_candidates(a.candidates)
    for name, seed in cells:
        refresh_cell(name, seed, a.out, a.results, a.data_root if a.rebuild else None, grid, not a.calibrate_only)
    print(f"kept cells: {a.results}; the summary: python benchmarks/evidence.py --summary-only --results {a.results}",
          flush=True)


if __name__ == "__main__":
    main()
