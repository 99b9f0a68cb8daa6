"""What a bench found, for people: statistics tables, pictures, and several runs (seeds) read together.

- `bench_statistics(folder, results)`: per-query scores of every method of one bench output (its
  golds.json and preds/), then `stats.method_statistics`.
- `results_plot` (results.png): primary metric with its CI per method against personalization seconds
  per user (log x; methods that cost nothing are drawn at the left edge).
- `selection_plot` (selection.png): per target, the assembled weight by sharer and layer; on data with
  known groups (groups.json), the sharers of the target's group are starred and red; below, the
  effective number of sharers by layer per target and the spread between targets (`mixing`).
- `report(folders, out)` (`perpcs report`): bench outputs of several seeds pooled, queries paired by
  (seed, query id), with the same statistics: OUT/report.json, report.md, report.png.

The Markdown of all of it is in `tables`. Figures are drawn on `matplotlib.figure.Figure` (the Agg
canvas, no pyplot state, no display).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from perpcs.evaluation import per_query, read_lamp_outputs, resolve_task
from perpcs.mixing import layer_of, per_layer, summarize
from perpcs.recipe import Recipe
from perpcs.results import BenchResults
from perpcs.runfolder import RunFolder
from perpcs.stats import LEVEL, method_statistics
from perpcs.tables import report_table
from perpcs.utils import atomic_path, check_output_dir, write_json, write_text


def folder_scores(folder: Path, dataset: str | Path, methods) -> dict[str, dict[str, float]]:
    """{method: {query id: primary metric}} of one bench output, read from its LaMP files; `dataset`:
    the data folder the bench scored."""
    data = Path(dataset)
    if not (data / "task.json").exists():
        raise FileNotFoundError(f"{folder / 'results.json'}: field 'dataset': {data} has no task.json "
                                "(the data folder the bench scored, needed to score again)")
    task = resolve_task(data)
    _, golds = read_lamp_outputs(folder / "golds.json")
    return {m: per_query(task, golds, read_lamp_outputs(folder / "preds" / f"{m}.json")[1]) for m in methods}


def _statistics(scores: dict, results: dict) -> dict:
    return {"level": LEVEL, "ci": "percentile bootstrap of the mean over queries",
            "test": "exact two-sided sign test on wins vs losses (scipy.stats.binomtest)",
            "seed": results["seed"], "methods": method_statistics(scores, results["primary_metric"]["higher_is_better"],
                                                                  results["seed"])}


def bench_statistics(folder: str | Path, results: dict) -> dict:
    """The statistics block of one bench's results.json."""
    return _statistics(folder_scores(Path(folder), results["dataset"], results["methods"]), results)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def results_plot(r: dict, path: str | Path) -> Path:
    """Primary metric (with CI) per method against personalization seconds per user, log x."""
    s, primary = r["statistics"]["methods"], r["primary_metric"]["name"]
    secs = {m: r["methods"][m]["personalize_seconds_per_user"] for m in s}
    positive = [t for t in secs.values() if t > 0]
    floor = min(positive) / 10 if positive else 1e-3  # where the free methods sit on a log axis
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab20"].colors
    for i, (m, st) in enumerate(s.items()):
        ax.errorbar([secs[m] or floor], [st["mean"]], yerr=[[st["mean"] - st["ci"][0]], [st["ci"][1] - st["mean"]]],
                    fmt="os^Dv<>p"[i % 8], color=colors[i % 20], capsize=3, label=m)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"personalization seconds per user (log; no cost drawn at {floor:.2g})")
    ax.set_ylabel(f"{primary} ({'higher' if r['primary_metric']['higher_is_better'] else 'lower'} is better), "
                  f"{r['statistics']['level']:.0%} CI")
    seeds = ", ".join(str(x) for x in r.get("seeds", [r["seed"]]))
    ax.set_title(f"{r['task']}: {r['n_queries']} queries, seed(s) {seeds}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def selection_plot(run: RunFolder, path: str | Path, groups: dict[str, int] | None = None) -> Path:
    """Per target, the assembled weight of each sharer at each layer (mean over the layer's positions)."""
    pool = run.open_pool()
    sharers = [s.user_id for s in run.selection()]
    row = {pool.pseudonym(u): i for i, u in enumerate(sharers)}
    targets = run.split["targets"]
    recipes = {uid: Recipe.load(run.recipe_path(uid)) for uid in targets}
    grids = {}
    for uid in targets:
        pieces = recipes[uid].pieces
        layers = sorted({layer_of(p) for p in pieces})
        grid, count = np.zeros((len(sharers), len(layers))), defaultdict(int)
        for pos, chosen in pieces.items():
            count[layer_of(pos)] += 1
            for sid, w in chosen:
                grid[row[sid], layers.index(layer_of(pos))] += w
        grids[uid] = layers, grid / np.array([count[layer] for layer in layers])
    cols = min(4, len(targets))
    nrows = -(-len(targets) // cols)
    fig = Figure(figsize=(3.2 * cols + 1.5, (0.25 * len(sharers) + 1.3) * nrows + 2.8), layout="constrained")
    grid_fig, mix_fig = fig.subfigures(2, 1, height_ratios=[(0.25 * len(sharers) + 1.3) * nrows + 0.5, 2.3])
    axes = grid_fig.subplots(nrows, cols, squeeze=False)
    vmax = max(g.max() for _, g in grids.values()) or 1.0
    for ax, uid in zip(axes.flat, targets):
        layers, grid = grids[uid]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ticks = range(0, len(layers), max(1, len(layers) // 8))  # a readable few of 30 layers
        ax.set_xticks(ticks, [str(layers[i]) for i in ticks])
        ax.set_title(uid if not groups else f"{uid} (group {groups[uid]})", fontsize=8)
        ax.set_yticks(range(len(sharers)))
        same = [bool(groups) and groups.get(u) == groups[uid] for u in sharers]
        ax.set_yticklabels([("* " if s else "") + u for u, s in zip(sharers, same)], fontsize=6)
        for label, s in zip(ax.get_yticklabels(), same):
            label.set_color("red" if s else "black")
        ax.set_xlabel("layer", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    grid_fig.colorbar(image, ax=axes, shrink=0.6, label="assembled weight (mean over the layer's positions)")
    mix = summarize(recipes)
    ax = mix_fig.subplots()
    for uid in targets:
        layers = per_layer(recipes[uid])
        ax.plot(list(layers), list(layers.values()), marker=".", label=uid)
    ax.set_xlabel("layer", fontsize=7)
    ax.set_ylabel("effective sharers\n(exp entropy)", fontsize=7)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6, ncols=min(6, len(targets)))
    ax.set_title(f"mixing: {mix['effective_sharers_mean']:.2f} effective sharers per position on average "
                 "(1 = one-hot); " + ("spread between targets n/a" if mix["spread"] is None else
                                      f"spread between targets {mix['spread']:.2f} (0 = the same weights for "
                                      "every target)"), fontsize=8)
    fig.suptitle("Per-Pcs selection by target: sharer x layer"
                 + ("; * red: sharer of the target's group" if groups else ""),
                 fontsize=9)
    return _save(fig, Path(path))


def report(folders: list[str | Path], out: str | Path) -> dict:
    """Bench outputs of several seeds read together; writes OUT/report.json, report.md, report.png."""
    folders, out = [Path(f) for f in folders], Path(out)
    check_output_dir(out, {"report.json", "report.md", "report.png", "seed-*"})  # `bench --seeds` writes seed-N
    runs = []
    for f in folders:
        if not (f / "results.json").exists():
            raise FileNotFoundError(f"{f}: no results.json (not a finished `perpcs bench` output)")
        runs.append((f, BenchResults.load(f / "results.json").as_json()))
    first = runs[0][1]
    for f, r in runs:
        if (r["task"], r["primary_metric"]) != (first["task"], first["primary_metric"]):
            raise ValueError(f"{f}: task {r['task']!r}, not {first['task']!r} as {runs[0][0]}: "
                             "only runs of one task pool")
    seeds = [r["seed"] for _, r in runs]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds {seeds}: two runs of one seed would count their queries twice")
    methods = [m for m in first["methods"] if all(m in r["methods"] for _, r in runs)]
    pooled: dict[str, dict[str, float]] = {m: {} for m in methods}
    for f, r in runs:
        for m, s in folder_scores(f, r["dataset"], methods).items():
            pooled[m].update({f"{r['seed']}/{q}": v for q, v in s.items()})
    primary = first["primary_metric"]["name"]
    result = {"task": first["task"], "kind": first["kind"], "dataset": first["dataset"],
              "primary_metric": first["primary_metric"], "seeds": seeds, "seed": seeds[0],
              "folders": [str(f) for f in folders], "n_queries": len(pooled[methods[0]]) if methods else 0,
              "methods": {m: {"per_seed": [r["methods"][m]["metrics"][primary] for _, r in runs],
                              **{k: statistics.mean(r["methods"][m][k] for _, r in runs)
                                 for k in ("personalize_seconds_per_user", "bytes_per_user")}} for m in methods}}
    if all("diagnostics" in r for _, r in runs):  # known latent groups (synthetic data)
        result["same_group_weight"] = {"perpcs": [r["diagnostics"]["same_group_weight"] for _, r in runs],
                                       **{v: [r["variants"][v]["diagnostics"]["same_group_weight"] for _, r in runs]
                                          for v in first.get("variants", {})},
                                       "random picking": [r["diagnostics"]["same_group_chance"] for _, r in runs]}
    result["statistics"] = _statistics(pooled, result)
    result["statistics"]["pairing"] = "queries of all runs pooled, paired by (seed, query id)"
    results_plot(result, out / "report.png")
    write_json(out / "report.json", result)
    write_text(out / "report.md", report_table(result) + "\n")
    return result
