"""The evidence suite: does the calibrated default hold on every kind of data? A matrix of (data set, seed) cells.

Each cell is one `perpcs bench` with no rule setting (so the pool calibrates itself: the `perpcs` row),
every fixed rule of the calibration grid as a variant on the same sharers (`paper` is the paper's rule),
non_personalized, peft_retrieval, prime, and OPPU on the first 4 targets. Sets: the demo at 3 seeds;
StudEmo valence, Last.fm tags and ML Anthology titles at 2 seeds each, Amazon Beauty ratings at 3 (its
users have one query each), read from ../shared/data (or --data-root). Targets are the most active
users, so on the real sets every seed scores the same queries with another split, pool and LoRAs.

After the suite, pool checks: `demo-12sharers` is each demo cell again with 12 sharers, derived from the demo
cell's run (only the 6 new sharers train), to test whether the pool's coverage of the targets' taste groups is what
limits the share of OPPU's gain; synthetic cells also keep coverage.json (per target, the sharers of its group).

Resumable: a cell already copied to benchmarks/results/evidence (or whose OUT/<set>/seed-<n>/results.json
exists) is skipped, so a later run goes on where the last stopped. Cells run seed by seed (every set's
first seed before any second one), and a worker skips a cell another worker holds
(OUT/<set>/seed-<n>.lock), so one worker per core shares the queue. Each finished cell is copied to
benchmarks/results/evidence/<set>-seed<n>/ (results.json, results.md, the plots, and per-query scores in
scores.json; no raw data: no golds or predictions). The summary reads those copies:
benchmarks/results/evidence/evidence.{md,json,png}. Its tests pair by (seed, query), as the suite counts
queries; on imported sets, whose seeds can score the same queries, it also tests each line with one unit per
distinct query.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/evidence.py [--sets demo studemo ...] [--out runs/evidence]
    python benchmarks/evidence.py --summary-only
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from matplotlib.figure import Figure
from matplotlib.image import thumbnail

from perpcs.bench import BenchSettings, bench
from perpcs.report import folder_scores
from perpcs.rules import GRID, RULES
from perpcs.settings import RunConfig
from perpcs.stats import method_statistics, paired
from perpcs.utils import atomic_path, read_json, write_json, write_text

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "evidence"
BENCHED = [n for n in RULES if n != "none"]  # bench variants: the grid's fixed rules and the opt-in ones
PLOT_BYTES = 1 << 20  # a plot over 1 MiB is kept at half its resolution (the full one stays in the run folder)
METHODS = ["non_personalized", "peft_retrieval", "prime", "oppu", "perpcs"]

# name -> (seeds, `perpcs data ...` arguments given {src}, {out} and {seed}, RunConfig fields)
SETS: dict[str, tuple[tuple[int, ...], list[str], dict]] = {
    "demo": ((0, 1, 2), ["synth", "--kind", "classification", "--users", "48", "--queries", "12", "--seed", "{seed}",
                         "--out", "{out}"],
             {"n_targets": 6, "n_sharers": 6, "task_train": {"steps": 25}}),
    "studemo": ((0, 1), ["import", "annotator-csv", "{src}/studemo/text_data.csv.gz",
                         "{src}/studemo/annotation_data.csv",
                         "--label", "valence", "--max-tokens", "48", "--queries", "16", "--seed", "{seed}",
                         "--out", "{out}"],
                {"n_targets": 8, "n_sharers": 6}),
    "lastfm": ((0, 1), ["import", "lastfm-tags", "{src}/lastfm-hetrec2011", "--max-users", "48", "--min-history", "20",
                        "--queries", "10", "--seed", "{seed}", "--out", "{out}"],
               {"n_targets": 10, "n_sharers": 6}),
    # 105 reviewers keep 3 distinct reviews or more, one query each: 3 seeds to pass 200 scored queries
    "beauty": ((0, 1, 2), ["import", "amazon-reviews", "{src}/amazon-reviews-2018/All_Beauty_5.json.gz", "--target",
                           "rating", "--min-history", "2", "--max-tokens", "64", "--queries", "1", "--seed", "{seed}",
                           "--out", "{out}"],
               {"n_targets": 70, "n_sharers": 6, "min_sharer_items": 2}),
    "papers": ((0, 1), ["import", "papers-jsonl", "{src}/mlanthology/mlanthology_subset_300authors.jsonl.gz",
                        "--max-users", "60", "--max-tokens", "64", "--queries", "5", "--seed", "{seed}",
                        "--out", "{out}"],
               {"n_targets": 20, "n_sharers": 6}),
}
# name -> (source set, RunConfig fields changed): the source's cells again with a larger pool, derived from each
# source cell's run (same data, task model, split, OPPU and shared sharers' LoRAs; only new sharers train). Not part
# of the suite's checks: it tests whether the pool's coverage of the targets limits the share of OPPU's gain.
POOL_CHECKS: dict[str, tuple[str, dict]] = {"demo-12sharers": ("demo", {"n_sharers": 12})}
ALL = [*SETS, *POOL_CHECKS]


def seeds_of(name: str) -> tuple[int, ...]:
    return SETS[POOL_CHECKS[name][0] if name in POOL_CHECKS else name][0]


def make_data(args: list[str], src: Path, out: Path, seed: int) -> None:
    """The cell's data folder, written by the perpcs CLI itself (the importers a user would run)."""
    from typer.testing import CliRunner

    from perpcs.cli import app

    if (out / "users.jsonl").exists():
        return
    argv = [a.format(src=src, out=out, seed=seed) for a in args]
    result = CliRunner().invoke(app, ["data", *argv])
    if result.exit_code:
        raise SystemExit(f"perpcs data {' '.join(argv)} failed:\n{result.output}")


def cells(sets: list[str], seeds: list[int] | None, extra: list[int] | None = None) -> list[tuple[str, int]]:
    """Seed by seed: every set's first seed before any set's second, so the suite widens before it deepens; the pool
    checks after the suite. `extra`: seeds beyond each set's own, after them (fresh cells, e.g. to test a change
    decided on the suite's cells out of sample)."""
    def own(n: str) -> tuple[int, ...]:
        return seeds_of(n) + tuple(s for s in extra or () if s not in seeds_of(n))

    def order(group: list[str]) -> list[tuple[str, int]]:
        return [(n, own(n)[i]) for i in range(max((len(own(n)) for n in group), default=0)) for n in group
                if i < len(own(n)) and (seeds is None or own(n)[i] in seeds or own(n)[i] not in seeds_of(n))]
    return order([n for n in sets if n in SETS]) + order([n for n in sets if n in POOL_CHECKS])


def run_cell(name: str, seed: int, out: Path, src: Path, results: Path = RESULTS) -> Path | None:
    """Bench the cell (unless done) and copy it to `results`; None if it is already there (run folders do not
    outlive the machine; the copies are committed) or another worker holds it."""
    folder = out / name / f"seed-{seed}"
    if (results / f"{name}-seed{seed}" / "scores.json").exists():
        print(f"skip {name} seed {seed}: kept in {results / f'{name}-seed{seed}'}", flush=True)
        return None
    if (folder / "results.json").exists():
        print(f"skip {name} seed {seed}: {folder / 'results.json'} exists", flush=True)
        return keep(name, seed, folder, results)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(folder.parent / f"seed-{seed}.lock", timeout=0):
            return _bench_cell(name, seed, folder, out, src, results)
    except Timeout:
        print(f"skip {name} seed {seed}: another worker holds {folder.parent / f'seed-{seed}.lock'}", flush=True)
        return None


def _bench_cell(name: str, seed: int, folder: Path, out: Path, src: Path, results: Path) -> Path:
    if not (folder / "results.json").exists():  # a worker may have finished it while this one waited
        source, changed = POOL_CHECKS.get(name, (name, {}))
        _, data_args, fields = SETS[source]
        data = out / source / f"data-{seed}"
        make_data(data_args, src, data, seed)
        print(f"cell {name} seed {seed}: bench into {folder}", flush=True)
        t0 = time.perf_counter()
        config = RunConfig(data=str(data), seed=seed, **fields).updated(changed)
        if changed:
            derive(out / source / f"seed-{seed}" / "run", folder / "run", config)
        settings = BenchSettings(methods=METHODS, variants={n: RULES[n] for n in BENCHED}, oppu_targets=4)
        bench(data, folder, config, settings)
        print(f"cell {name} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return keep(name, seed, folder, results)


def derive(src: Path, dst: Path, config: RunConfig) -> None:
    """Start `dst` from the source cell's finished run, as benchmarks/rebench.py does; without one (run folders do
    not outlive the machine) the bench starts from scratch, which the seed makes the same task model and split."""
    from perpcs.pipeline import Run

    if (dst / "run.json").exists() or not (src.parent / "results.json").exists():
        return
    Run(src).derive(dst, config)
    (dst / "oppu").symlink_to((src / "oppu").resolve())


def coverage(folder: Path) -> dict | None:
    """Synthetic data only (its groups.json is the truth): per target, its group, how many sharers share it, and
    the chance that as many sharers drawn at random from the candidates would include none (hypergeometric)."""
    from scipy.stats import hypergeom

    groups_file = Path(read_json(folder / "run" / "run.json")["data"]) / "groups.json"
    if not groups_file.exists():
        return None
    groups = read_json(groups_file)
    sharers = [s["user_id"] for s in read_json(folder / "run" / "selection.json")]
    split = read_json(folder / "run" / "split.json")
    return {t: {"group": groups[t], "same_group_sharers": sum(groups[s] == groups[t] for s in sharers),
                "none_at_random": float(hypergeom.pmf(0, len(split["candidates"]), sum(
                    groups[c] == groups[t] for c in split["candidates"]), len(sharers)))}
            for t in split["targets"]}


def keep(name: str, seed: int, folder: Path, results: Path) -> Path:
    """Copy a finished cell into benchmarks/results/evidence: results, plots and per-query scores only."""
    dst = results / f"{name}-seed{seed}"
    dst.mkdir(parents=True, exist_ok=True)
    results = read_json(folder / "results.json")
    write_json(dst / "scores.json", folder_scores(folder, results["dataset"], results["methods"]))
    if (cov := coverage(folder)) is not None:
        write_json(dst / "coverage.json", cov)
    for f in ("results.json", "results.md", "results.png", "selection.png", "selection-paper.png"):
        if (folder / f).exists():
            with atomic_path(dst / f) as tmp:
                if f.endswith(".png") and (folder / f).stat().st_size > PLOT_BYTES:  # many targets: a big grid
                    with open(tmp, "wb") as out:
                        thumbnail(str(folder / f), out, scale=0.5)
                else:
                    shutil.copy(folder / f, tmp)
    return dst


def _pooled(cells: list[Path]) -> tuple[dict, dict[str, dict[str, float]]]:
    runs = [read_json(c / "results.json") for c in cells]
    methods = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
    pooled: dict[str, dict[str, float]] = {m: {} for m in methods}
    for c, r in zip(cells, runs):
        for m, s in read_json(c / "scores.json").items():
            if m in pooled:
                pooled[m].update({f"{r['seed']}/{q}": v for q, v in s.items()})
    return runs[0], pooled


def transfer(run: dict) -> dict | None:
    """Does the validation users' ranking of the grid's rules hold on the targets? Over the rules scored on both
    (none = non_personalized on the targets), Spearman's rho of the selection metric, and the targets' regret:
    the best rule's primary metric on the targets minus the chosen one's (0: the choice was the targets' best)."""
    from scipy.stats import spearmanr

    cal = run.get("calibration")
    if not cal:
        return None
    metric, primary = cal["metric"], run["primary_metric"]["name"]
    sign = 1 if run["primary_metric"]["higher_is_better"] else -1
    on_targets = {n: run["methods"]["non_personalized" if n == "none" else n]["metrics"]
                  for n in cal["candidates"] if ("non_personalized" if n == "none" else n) in run["methods"]}
    names = list(on_targets)
    rho = spearmanr([cal["candidates"][n]["metrics"][metric] for n in names],
                    [on_targets[n][metric] for n in names]).statistic if len(names) > 2 else None
    best = max(names, key=lambda n: sign * on_targets[n][primary])
    chosen = cal["chosen"]
    return {"rules": len(names), "spearman": None if rho is None or rho != rho else float(rho),
            "targets_best": best, "chosen": chosen, "validation_best": cal.get("best", chosen),
            "regret": (sign * (on_targets[best][primary] - on_targets[chosen][primary])
                       if chosen in on_targets else None),
            "history_items": {"validation": cal["validation"].get("context_items_mean"),
                              "targets": cal["validation"].get("target_history_items_mean")},
            "validation": {n: cal["candidates"][n]["metrics"][metric] for n in names},
            "targets": {n: on_targets[n][metric] for n in names}}


def repeats_queries(name: str) -> bool:
    """Whether the set's seeds score the same queries: an imported set reads the same users at every seed (with
    another split, pool and LoRAs), the synthetic demo draws new users per seed."""
    return SETS[POOL_CHECKS[name][0] if name in POOL_CHECKS else name][1][0] == "import"


def by_query(a: dict[str, float], b: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """a and b keyed by "seed/query", as each distinct query's mean over the seeds where both scored it: one unit
    per query, for a paired test that does not count a query repeated across seeds as new evidence."""
    seeds: dict[str, list[str]] = {}
    for key in sorted(set(a) & set(b)):
        seeds.setdefault(key.split("/", 1)[1], []).append(key)
    return ({q: statistics.mean(a[k] for k in keys) for q, keys in seeds.items()},
            {q: statistics.mean(b[k] for k in keys) for q, keys in seeds.items()})


def summarize_set(name: str, cells: list[Path]) -> dict:
    """One set over its finished seeds: pooled per-query statistics, the calibrated choices, the checks."""
    first, pooled = _pooled(cells)
    higher = first["primary_metric"]["higher_is_better"]
    sign = 1 if higher else -1
    st = method_statistics(pooled, higher)
    runs = [read_json(c / "results.json") for c in cells]
    # the rules every seed's calibration chose from: the default grid, or more where a test added candidates
    grid = [n for n in RULES if all(n in r.get("calibration", {}).get("grid", GRID) for r in runs)]
    fixed = [n for n in grid if n != "none" and n in st]  # "the best fixed rule" is one of them
    best_fixed = max(fixed, key=lambda n: sign * st[n]["mean"])
    np_ref = "non_personalized"

    def vs(a: str, b: str) -> dict:
        return paired(pooled[a], pooled[b], higher)

    def vs_by_query(a: str, b: str) -> dict:
        return paired(*by_query(pooled[a], pooled[b]), higher)

    measured = [m for m in ("oppu", "peft_retrieval", "prime", *fixed) if m in pooled]

    def lines_met(test) -> dict:
        """The suite's significance lines under one paired test."""
        def better(a: str, b: str) -> bool:  # a significantly better than b
            c = test(a, b)
            return sign * c["diff"] > 0 and c["p"] < 0.05

        winners = [m for m in measured if better(m, np_ref)]
        return {"significant_winners_vs_np": winners,
                "calibrated_significant_vs_np_where_any_is": better("perpcs", np_ref) if winners else None,
                "calibrated_not_significantly_worse_than_np": not better(np_ref, "perpcs"),
                "calibrated_not_significantly_worse_than_best_fixed": not better(best_fixed, "perpcs"),
                "oppu_significant_gain": "oppu" in pooled and better("oppu", np_ref)}

    checks = lines_met(vs)
    share = st["perpcs"]["gain_share"] if checks["oppu_significant_gain"] else None
    by_query_lines = None
    if repeats_queries(name):
        by_query_lines = {"queries": len(by_query(pooled["perpcs"], pooled[np_ref])[0]),
                          "calibrated_vs_np": vs_by_query("perpcs", np_ref), **lines_met(vs_by_query)}
    return {
        "set": name, "task": first["task"], "kind": first["kind"], "metric": first["primary_metric"],
        "seeds": [r["seed"] for r in runs], "queries": len(pooled["perpcs"]),
        "chosen": [r.get("calibration", {}).get("chosen") for r in runs], "grid": grid,
        # seeds without a row for some rule of today's (benchmarks/grid_refresh.py brings a cell up to them)
        "missing_rules": {r["seed"]: missing for r in runs
                          if (missing := [n for n in RULES if n != "none" and n not in r["methods"]])},
        # opt-in rules (not calibration candidates), measured on the targets like the fixed rules
        "opt_in": {n: {"mean": st[n]["mean"], "vs_np": vs(n, np_ref), "vs_calibrated": vs(n, "perpcs"),
                       "share_of_oppu_gain": st[n]["gain_share"] if checks["oppu_significant_gain"] else None}
                   for n in RULES if n not in grid and n in pooled},
        "validation_queries": [r.get("calibration", {}).get("validation", {}).get("queries") for r in runs],
        # a seed whose pool declined assembles nothing (no forward), so its ratio says nothing about assembly
        "time_ratio": [r["alternating_costs"]["time_ratio"]["median"] for r in runs if "alternating_costs" in r
                       and r.get("calibration", {}).get("chosen") != "none"],
        "transfer": [transfer(r) for r in runs],
        "methods": {m: {"mean": s["mean"], "ci": s["ci"], "n": s["n"],
                        "vs_np": vs(m, np_ref) if m != np_ref else None} for m, s in st.items()},
        "best_fixed": best_fixed,
        "checks": {
            **checks,
            "calibrated_at_least_as_good_as_peft_retrieval":
                sign * (st["perpcs"]["mean"] - st["peft_retrieval"]["mean"]) >= 0 if "peft_retrieval" in st else None,
            "share_of_oppu_gain": share,
        },
        "by_query": by_query_lines,
    }


def _ratio(s: dict) -> str:
    """OPPU's time over assembly's; a pool that declined assembles nothing, so there is no ratio to give."""
    if all(c == "none" for c in s["chosen"]):
        return "- (declined: no assembly)"
    return f"{statistics.median(s['time_ratio']):.1f}x" if s["time_ratio"] else "-"


def _significance_cells(c: dict) -> str:
    """The significance lines of one set under one test, as table cells."""
    return (f"{', '.join(c['significant_winners_vs_np']) or 'none'} | "
            f"{_yes(c['calibrated_significant_vs_np_where_any_is'])} | "
            f"{_yes(c['calibrated_not_significantly_worse_than_np'])} | "
            f"{_yes(c['calibrated_not_significantly_worse_than_best_fixed'])}")


def _header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def finished_cells(name: str, out: Path = RESULTS) -> list[Path]:
    """The set's cells copied to `out` with their per-query scores, by seed."""
    return sorted(c for c in out.glob(f"{name}-seed*") if (c / "scores.json").exists())


def write_summary(out: Path = RESULTS) -> dict:
    every = {}
    for name in ALL:
        if cells := finished_cells(name, out):
            every[name] = summarize_set(name, cells)
    sets = {n: s for n, s in every.items() if n in SETS}  # the suite; the pool checks are reported beside it
    if not sets:
        raise SystemExit(f"no finished cells in {out}")
    shares = [s["checks"]["share_of_oppu_gain"] for s in sets.values() if s["checks"]["share_of_oppu_gain"] is not None]
    done = {n: len(s["seeds"]) == len(SETS[n][0]) for n, s in sets.items()}
    summary = {"sets": sets, "pool_checks": {n: s for n, s in every.items() if n in POOL_CHECKS},
               "coverage": {n: c for n in every if (c := coverage_table(out, n))},
               "complete": all(done.values()) and len(sets) == len(SETS),
               "mean_share_of_oppu_gain": statistics.mean(shares) if shares else None,
               "peft_retrieval_at_least_as_good": sum(bool(s["checks"]["calibrated_at_least_as_good_as_peft_retrieval"])
                                                      for s in sets.values())}
    lines = ["# Evidence suite: the calibrated default on every set", "",
             "Cells finished: " + ", ".join(f"{n} seeds {s['seeds']}" for n, s in sets.items())
             + ("" if summary["complete"] else " (suite incomplete; planned: "
                + ", ".join(f"{n} {len(v[0])} seeds" for n, v in SETS.items()) + ")") + ".",
             "Per set, all seeds' queries pooled and paired by (seed, query id); tests are the bench's two-sided "
             "sign test (p < 0.05). `perpcs` is the calibrated default (no --set); `paper` the paper's rule; "
             "the other fixed rules are calibration's grid, run on the targets too.",
             *grid_lines(every), "",
             *_header("set", "metric", "queries", "calibrated choice per seed", "perpcs", "non_personalized",
                      "peft_retrieval", "oppu", "best fixed rule", "OPPU/assembly time")]
    for n, s in every.items():
        m = s["methods"]

        def cell(k: str) -> str:
            if k not in m:
                return "-"
            v = m[k]["vs_np"]
            return f"{m[k]['mean']:.3f}" + ("" if v is None else f" ({v['diff']:+.3f}, p={v['p']:.2g})")
        lines.append(f"| {n} | {s['metric']['name']} | {s['queries']} | {', '.join(map(str, s['chosen']))} | "
                     f"{cell('perpcs')} | {cell('non_personalized')} | {cell('peft_retrieval')} | {cell('oppu')} | "
                     f"{s['best_fixed']}: {cell(s['best_fixed'])} | "
                     + _ratio(s) + " |")
    lines += ["", "Differences are to non_personalized, in the metric's units (for MAE, negative is better).", "",
              *_header("set", "any method significantly above NP", "calibrated too", "calibrated not worse than NP",
                       "not worse than best fixed", ">= peft_retrieval", "share of OPPU's gain")]
    for n, s in every.items():
        c = s["checks"]
        lines.append(f"| {n} | {_significance_cells(c)} | {_yes(c['calibrated_at_least_as_good_as_peft_retrieval'])} | "
                     + ("-" if c["share_of_oppu_gain"] is None else f"{c['share_of_oppu_gain']:.0%}") + " |")
    lines += opt_in_lines(every)
    repeated = {n: s["by_query"] for n, s in every.items() if s["by_query"]}
    if repeated:
        lines += ["", "On the imported sets every seed reads the same users (with another split, pool and LoRAs), so "
                  "seeds can score the same queries, and the tests above count such a query once per seed. The same "
                  "lines with one unit per distinct query (its scores averaged over the seeds, then the sign test):",
                  "",
                  *_header("set", "distinct queries", "calibrated vs NP", "significantly above NP, by query",
                           "calibrated too", "calibrated not worse than NP", "not worse than best fixed")]
        for n, c in repeated.items():
            v = c["calibrated_vs_np"]
            lines.append(f"| {n} | {c['queries']} | {v['diff']:+.3f} (p={v['p']:.2g}) | {_significance_cells(c)} |")
    lines += ["", "Transfer from validation users to targets, per seed: Spearman's rho between the rules' "
              "selection metric on validation users and on the targets (none = non_personalized), the best rule on "
              "validation and on the targets, the chosen one, and the targets' regret (best rule's primary metric "
              "minus the chosen one's).", "",
              *_header("set", "seed", "rules", "rho", "best on validation", "chosen", "best on targets", "regret",
                       "history items (validation / targets)")]
    for n, s in every.items():
        for seed, t in zip(s["seeds"], s["transfer"]):
            if t:
                rho = "-" if t["spearman"] is None else f"{t['spearman']:+.2f}"
                regret = "-" if t["regret"] is None else f"{t['regret'] + 0.0:.3f}"  # + 0.0: no "-0.000"
                h = t["history_items"]
                items = "-" if h["validation"] is None else f"{h['validation']:.0f} / {h['targets']:.0f}"
                lines.append(f"| {n} | {seed} | {t['rules']} | {rho} | {t['validation_best']} | {t['chosen']} | "
                             f"{t['targets_best']} | {regret} | {items} |")
    share = summary["mean_share_of_oppu_gain"]
    lines += ["", f"At least as good as peft_retrieval on {summary['peft_retrieval_at_least_as_good']} of "
              f"{len(sets)} sets; mean share of OPPU's gain over the sets where OPPU beats NP significantly: "
              + ("-" if share is None else f"{share:.0%}") + ".",
              *coverage_lines(summary["coverage"]),
              "", "![forest plot: paired difference to non_personalized per method and set](evidence.png)", ""]
    write_json(out / "evidence.json", summary)
    write_text(out / "evidence.md", "\n".join(lines))
    forest_plot(every, out / "evidence.png")
    print(f"wrote {out / 'evidence.md'}, {out / 'evidence.json'} and {out / 'evidence.png'}")
    return summary


def grid_lines(every: dict) -> list[str]:
    """Which cells lack a row for some of today's rules (a set's pooled rows keep only the rules every one of its
    cells has)."""
    missing = [f"{n} seed {seed} ({', '.join(rules)})" for n, s in every.items()
               for seed, rules in s["missing_rules"].items()]
    grids = {tuple(s["grid"]) for s in every.values()}
    grid = (", ".join(grids.pop()) if len(grids) == 1 else
            "; ".join(f"{n}: {', '.join(s['grid'])}" for n, s in every.items()))
    opt_in = [n for n in RULES if all(n not in s["grid"] for s in every.values())]
    return [f"Calibration's grid (what every cell's calibration chose from): {grid}; opt-in rules, measured on the "
            f"targets but not candidates: {', '.join(opt_in)}."
            + (f" Cells without a row for some rule: {'; '.join(missing)}." if missing else "")]


def opt_in_lines(every: dict) -> list[str]:
    """The opt-in rules per set, against NP and the calibrated default (they do not enter the lines above)."""
    rows = [(n, r, o) for n, s in every.items() for r, o in s["opt_in"].items()]
    if not rows:
        return []
    lines = ["", "Opt-in rules on the targets, against non_personalized and against the calibrated default "
             "(paired, sign test). They are not calibration candidates by default, so the lines above leave them "
             "out; counted as a fixed rule, a significant lead over the calibrated default would miss "
             "\"not worse than the best fixed rule\".", "",
             *_header("set", "rule", "mean", "vs NP", "vs calibrated", "share of OPPU's gain")]
    for n, r, o in rows:
        a, b, share = o["vs_np"], o["vs_calibrated"], o.get("share_of_oppu_gain")
        lines.append(f"| {n} | {r} | {o['mean']:.3f} | {a['diff']:+.3f} (p={a['p']:.2g}) | "
                     f"{b['diff']:+.3f} (p={b['p']:.2g}) | {'-' if share is None else f'{share:.0%}'} |")
    return lines


def coverage_table(out: Path, name: str) -> dict | None:
    """Over a synthetic set's cells, OPPU's queries grouped by how many sharers share the target's group (0, 1, 2+):
    non_personalized, perpcs and OPPU there, and perpcs's share of OPPU's gain."""
    rows: dict[int, dict[str, list[float]]] = {}
    targets: dict[int, set[str]] = {}
    uncovered, at_random = 0, 0.0
    for cell in finished_cells(name, out):
        if not (cell / "coverage.json").exists():
            continue
        cov, scores = read_json(cell / "coverage.json"), read_json(cell / "scores.json")
        uncovered += sum(c["same_group_sharers"] == 0 for c in cov.values())
        at_random += sum(c["none_at_random"] for c in cov.values())
        for q in scores.get("oppu", {}):
            target = next(t for t in cov if q.startswith(f"{t}-"))
            n = min(cov[target]["same_group_sharers"], 2)
            targets.setdefault(n, set()).add(f"{cell.name}/{target}")
            for m in ("non_personalized", "perpcs", "oppu"):
                rows.setdefault(n, {}).setdefault(m, []).append(scores[m][q])
    table = []
    for n in sorted(rows):
        means = {m: statistics.mean(v) for m, v in rows[n].items()}
        gain = means["oppu"] - means["non_personalized"]
        table.append({"same_group_sharers": n, "targets": len(targets[n]), "queries": len(rows[n]["oppu"]), **means,
                      "share_of_oppu_gain": (means["perpcs"] - means["non_personalized"]) / gain if gain > 0 else None})
    if not table:
        return None
    return {"rows": table, "targets_without_group_sharer": uncovered, "expected_at_random": at_random}


def coverage_lines(tables: dict[str, dict]) -> list[str]:
    if not tables:
        return []
    lines = ["", "Synthetic sets only (groups.json is the truth): OPPU's queries by how many sharers share the "
             "target's taste group. Per-Pcs can only assemble what the pool holds; OPPU learns from the target.", "",
             *_header("set", "same-group sharers", "targets", "queries", "non_personalized", "perpcs", "oppu",
                      "share of OPPU's gain")]
    for n, table in tables.items():
        for r in table["rows"]:
            share = "-" if r["share_of_oppu_gain"] is None else f"{r['share_of_oppu_gain']:.0%}"
            lines.append(f"| {n} | {r['same_group_sharers']}{'+' if r['same_group_sharers'] == 2 else ''} | "
                         f"{r['targets']} | {r['queries']} | {r['non_personalized']:.3f} | {r['perpcs']:.3f} | "
                         f"{r['oppu']:.3f} | {share} |")
    lines += ["", "Targets with no sharer of their group, against the number expected had the sharers been drawn at "
              "random from the candidates: " + "; ".join(f"{n} {t['targets_without_group_sharer']} against "
                                                        f"{t['expected_at_random']:.1f}" for n, t in tables.items())
              + "."]
    return lines


def forest_plot(sets: dict, path: Path) -> None:
    """Per set, each method's paired difference to non_personalized with its 95% CI, signed so right is better."""
    fig = Figure(figsize=(4.2 * len(sets), 5.5), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    for ax, (n, s) in zip(axes, sets.items()):
        sign = 1 if s["metric"]["higher_is_better"] else -1
        rows = [(k, v["vs_np"]) for k, v in s["methods"].items() if v["vs_np"]]
        for y, (k, c) in enumerate(rows):
            lo, hi = sorted(sign * np.array(c["ci"]))
            colour = "tab:red" if k == "perpcs" else ("tab:green" if k == "oppu" else "tab:blue")
            ax.errorbar(sign * c["diff"], y, xerr=[[sign * c["diff"] - lo], [hi - sign * c["diff"]]], fmt="o",
                        color=colour, capsize=3, alpha=1.0 if c["p"] < 0.05 else 0.45)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(rows)), [k + (" (calibrated)" if k == "perpcs" else "") for k, _ in rows], fontsize=7)
        ratio = f"\nOPPU/assembly {_ratio(s)}" if s["time_ratio"] else ""
        ax.set_title(f"{n}: {s['metric']['name']}, {s['queries']} queries{ratio}\n"
                     f"chosen: {', '.join(map(str, s['chosen']))}", fontsize=8)
        ax.set_xlabel("difference to non_personalized (right is better); faded: p >= 0.05", fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="*", default=ALL, choices=ALL,
                   help="the suite's sets, then the pool checks (" + ", ".join(POOL_CHECKS) + ")")
    p.add_argument("--seeds", nargs="*", type=int, help="only these of each set's own seeds (default: all of them)")
    p.add_argument("--extra-seeds", nargs="*", type=int, default=[],
                   help="seeds beyond each set's own, run after them (fresh cells; with --seeds and none of its own, "
                        "only these); give them their own --results to keep them out of the suite's summary")
    p.add_argument("--out", type=Path, default=Path("runs/evidence"), help="where the cells' runs go")
    p.add_argument("--data-root", type=Path, default=ROOT.parent.parent / "shared" / "data")
    p.add_argument("--results", type=Path, default=RESULTS, help="where finished cells are copied and summarized")
    p.add_argument("--summary-only", action="store_true", help="only rewrite the summary from the finished cells")
    a = p.parse_args(argv)
    if not a.summary_only:
        if any(x < 0 for x in a.extra_seeds):
            raise SystemExit(f"--extra-seeds {a.extra_seeds}: seeds are 0 or more")
        for name, seed in cells(a.sets, a.seeds, a.extra_seeds):
            if (kept := run_cell(name, seed, a.out, a.data_root, a.results)) is not None:
                print(f"copied to {kept}", flush=True)
                write_summary(a.results)
    write_summary(a.results)


if __name__ == "__main__":
    sys.exit(main())
