"""How much history a target needs (`perpcs curve`): Per-Pcs and OPPU when each target keeps only
its newest k history items, k = 1, 2, 4, ... or all, with CIs, against the non-personalized model.

One run is built once (task model, sharers, pool); each point k is a run derived from it, with the
run's pool (`Run.derive` lends it), with `assembly.recent_k = k` (Per-Pcs assembles from the k newest
items) and a bench whose targets keep their k newest items (`BenchSettings.history_k`: OPPU trains on
them). Points below 5 items are the cold start. Without any history item a target gets the
non-personalized model (the bench's fallback), so that model's line is the curve at k = 0.

    OUT/run/                 the run; OUT/k-<k>/ each point's derived run and predictions
    OUT/curve.json, curve.md, curve.png
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from perpcs.bench import Bench
from perpcs.evaluation import primary_metric
from perpcs.pipeline import Run
from perpcs.report import folder_scores
from perpcs.settings import BenchSettings, RunConfig
from perpcs.stats import bootstrap_ci
from perpcs.tables import curve_table
from perpcs.utils import atomic_path, check_output_dir, write_json, write_text

POINTS = ("1", "2", "4", "8", "16", "32", "all")
METHODS = ("perpcs", "oppu")


def parse_points(points: list[str]) -> list[str]:
    for p in points:
        if p != "all" and not (p.isdigit() and int(p) >= 1):
            raise ValueError(f"--points {p!r}: expected whole numbers >= 1 or 'all'")
    return sorted(set(points), key=lambda p: float("inf") if p == "all" else int(p))


def curve(data: str | Path, out: str | Path, config: RunConfig, points: list[str] = list(POINTS),
          oppu_targets: int | None = None) -> dict:
    """Run every point; write OUT/curve.json, curve.md and curve.png."""
    out, points = Path(out), parse_points(points)
    check_output_dir(out, {"run", "k-*", "curve.json", "curve.md", "curve.png"}, (Path(data),))
    run = Run.create(out / "run", config)
    run.pipeline()
    task = run.data.task
    primary, higher = primary_metric(task)
    longest = max(len(u.history) for u in run.users(run.split["targets"]))
    rows: dict[str, dict[str, dict]] = {m: {} for m in ("non_personalized", *METHODS)}
    for point in points:
        folder = out / f"k-{point}"
        if point == "all":
            prun, settings = run, BenchSettings(methods=["non_personalized", *METHODS], oppu_targets=oppu_targets)
        else:
            # the same sharers and keys: `Run.derive` lends the point the run's pool, nothing is trained again
            prun = run.derive(folder / "run", config.updated({"assembly": {"recent_k": int(point)}}))
            prun.pipeline()
            settings = BenchSettings(methods=list(METHODS), oppu_targets=oppu_targets, history_k=int(point))
        methods = Bench(prun, settings, folder).evaluate()
        for m, scores in folder_scores(folder, data, methods).items():
            lo, hi = bootstrap_ci(scores.values(), config.seed)
            rows[m][point] = {"n": len(scores), "mean": sum(scores.values()) / len(scores), "ci": [lo, hi],
                              "personalize_seconds_per_user": methods[m]["personalize_seconds_per_user"]}
    r = {"dataset": str(data), "task": task.name, "seed": config.seed, "points": points, "longest_history": longest,
         "primary_metric": {"name": primary, "higher_is_better": higher}, "methods": rows}
    write_json(out / "curve.json", r)
    curve_plot(r, out / "curve.png")
    write_text(out / "curve.md", curve_table(r))
    return r


def curve_plot(r: dict, path: Path) -> Path:
    """The metric against history items kept (log2 x; 'all' at the longest target history), CI bands."""
    numeric = [int(p) for p in r["points"] if p != "all"]
    top = max(numeric, default=0)  # 'all' right of every point, at the longest history if that is further
    x_of = {p: (r["longest_history"] if r["longest_history"] > top else 2 * top) if p == "all" else int(p)
            for p in r["points"]}
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for m, by_point in r["methods"].items():
        pts = [p for p in r["points"] if p in by_point]
        xs = [x_of[p] for p in pts]
        if m == "non_personalized":  # one measurement: the same model at every k
            v = by_point["all"]
            ax.axhline(v["mean"], color="gray", linestyle="--", label=f"{m} (also k = 0, cold start)")
            ax.axhspan(*v["ci"], color="gray", alpha=0.15)
            continue
        line = ax.plot(xs, [by_point[p]["mean"] for p in pts], marker="o", label=m)[0]
        ax.fill_between(xs, [by_point[p]["ci"][0] for p in pts], [by_point[p]["ci"][1] for p in pts],
                        color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks([x_of[p] for p in r["points"]], [p if p != "all" else f"all ({r['longest_history']})"
                                                   for p in r["points"]])
    if numeric and min(numeric) < 5:
        ax.axvspan(min(numeric) / 1.2, 4.5, color="tab:blue", alpha=0.05, label="cold start (< 5 items)")
    ax.set_xlabel("newest history items each target keeps (log)")
    ax.set_ylabel(f"{r['primary_metric']['name']} ({'higher' if r['primary_metric']['higher_is_better'] else 'lower'} "
                  "is better), 95% CI")
    ax.set_title(f"{r['task']}: history curve, seed {r['seed']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
