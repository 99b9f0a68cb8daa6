"""Several `perpcs bench` runs (e.g. the demo at several seeds) read together: how much of a gap is noise.

One demo scores 60 queries, so one query is 1.7 accuracy points. This reads the bench output folders
given and writes, per method, the primary metric at each seed with its mean and spread, and, for
every Per-Pcs row against every baseline, a paired count over all queries of all runs (queries the
row scores better on, worse on, tied) with an exact two-sided sign test on the untied ones:

    python benchmarks/seeds.py runs/seeds/s0 runs/seeds/s1 ... --out benchmarks/results/demo-seeds.md
"""

import argparse
import statistics
from pathlib import Path

from scipy.stats import binomtest

from perpcs.baselines import split_method
from perpcs.bench import gain_share
from perpcs.evaluation import read_lamp_outputs, resolve_task, score
from perpcs.pipeline import Run
from perpcs.utils import read_json, write_text

BASELINES = ("non_personalized", "rag", "peft_retrieval", "oppu")


def per_query(folder: Path, method: str, task, golds: dict[str, str], primary: str) -> dict[str, float]:
    """The primary metric of one method on each query alone, scored exactly as the bench scores."""
    _, preds = read_lamp_outputs(folder / "preds" / f"{method}.json")
    return {q: score(task, {q: g}, {q: preds[q]})[primary] for q, g in golds.items()}


def pool_cover(folder: Path, results: dict) -> tuple[int, int]:
    """For data with known latent groups: how many target users have no sharer, and one sharer, of
    their group (the sharers' groups are in the bench's diagnostics)."""
    groups = read_json(Path(results["dataset"]) / "groups.json")
    sharers = results["diagnostics"]["sharer_groups"]
    counts = [sharers.count(groups[t]) for t in Run(folder / "run").split["targets"]]
    return counts.count(0), counts.count(1)


def perpcs_rows(results: dict) -> list[str]:
    """The Per-Pcs rows: `perpcs`, the bench's variants, each also with +rag."""
    return [m for m in results["methods"] if split_method(m)[0] in ("perpcs", *results.get("variants", {}))]


def main(folders: list[Path], out: Path) -> None:
    runs = [(f, read_json(f / "results.json")) for f in folders]
    first = runs[0][1]
    primary, higher = first["primary_metric"]["name"], first["primary_metric"]["higher_is_better"]
    methods = [m for m in first["methods"] if all(m in r["methods"] for _, r in runs)]
    lines = [f"# {len(runs)} bench runs of {first['task']} ({first['kind']}): {primary} "
             f"({'higher' if higher else 'lower'} is better)", "",
             "| method | " + " | ".join(f"seed {r['seed']}" for _, r in runs)
             + " | mean | sd | share of OPPU's gain (means) | s/user | time vs OPPU | bytes/user | storage vs OPPU |",
             "|---|" + "---|" * (len(runs) + 7)]
    mean = {m: {"metrics": {primary: statistics.mean(r["methods"][m]["metrics"][primary] for _, r in runs)},
                **{k: statistics.mean(r["methods"][m][k] for _, r in runs)
                   for k in ("personalize_seconds_per_user", "bytes_per_user")}} for m in methods}
    oppu_secs, oppu_bytes = (mean["oppu"][k] for k in ("personalize_seconds_per_user", "bytes_per_user"))
    for m in methods:
        vals = [r["methods"][m]["metrics"][primary] for _, r in runs]
        share = gain_share(mean, m, primary)
        secs = mean[m]["personalize_seconds_per_user"]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {statistics.mean(vals):.3f} | {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}"
                     + f" | {'-' if share is None else f'{share + 0.0:.0%}'} | {secs:.2f}"
                     + (f" | {oppu_secs / secs:.1f}x" if secs else " | -")
                     + f" | {mean[m]['bytes_per_user']:.0f}"
                     + (f" | {oppu_bytes / mean[m]['bytes_per_user']:.0f}x |" if mean[m]["bytes_per_user"] else " | - |"))
    if all("diagnostics" in r for _, r in runs):
        weights = {"perpcs": [r["diagnostics"]["same_group_weight"] for _, r in runs]}
        for name in first.get("variants", {}):
            weights[name] = [r["variants"][name]["diagnostics"]["same_group_weight"] for _, r in runs]
        lines += ["", "Own-group share of the assembled weight: "
                  + "; ".join(f"{n} " + ", ".join(f"{w:.0%}" for w in ws) for n, ws in weights.items())
                  + "; random picking " + ", ".join(f"{r['diagnostics']['same_group_chance']:.0%}" for _, r in runs) + "."]
        cover = [pool_cover(f, r) for f, r in runs]
        lines += ["", f"Target users whose latent group has no sharer / one sharer in the pool (of {first['n_targets']}): "
                  + ", ".join(f"{none} / {one}" for none, one in cover) + "."]

    # paired: every query of every run, the Per-Pcs row against the baseline on the same query
    scores: dict[str, dict[str, float]] = {m: {} for m in methods}
    for i, (folder, r) in enumerate(runs):
        task = resolve_task(r["dataset"])
        _, golds = read_lamp_outputs(folder / "golds.json")
        for m in methods:
            scores[m].update({f"{i}/{q}": v for q, v in per_query(folder, m, task, golds, primary).items()})
    lines += ["", f"Paired over all {len(scores[methods[0]])} queries: queries where the row is better / worse / "
              "tied against the baseline, and the exact two-sided sign test on the untied ones.", "",
              "| row | vs | better | worse | tied | p |", "|---|---|---|---|---|---|"]
    for row in (m for m in perpcs_rows(first) if m in methods):
        for base in BASELINES:
            base = base + "+rag" if split_method(row)[1] and base != "rag" else base
            if base not in methods:
                continue
            diff = [(scores[row][q] - scores[base][q]) * (1 if higher else -1) for q in scores[row]]
            better, worse = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
            p = binomtest(better, better + worse).pvalue if better + worse else 1.0
            lines.append(f"| {row} | {base} | {better} | {worse} | {len(diff) - better - worse} | {p:.2g} |")
    write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+", help="bench output folders (each with results.json, golds.json, preds/)")
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    a = ap.parse_args()
    main(a.folders, a.out)
