"""Privacy against utility: `perpcs privacy` on a finished bench, and on runs derived from it with
protection at several strengths, each with the bench's primary metric (95% bootstrap CI over queries).

From a bench output made with `--methods non_personalized --methods oppu --methods perpcs --variant gate:key=gate`:
- the attacks on its activation-key run and on its gate-key variant (same sharers and LoRAs; the
  OPPU adapters of the bench serve as the assembled PEFT's reference and as the reference leak);
- `key_noise` at each --noise z (a run derived with key_noise=z: the same sharer LoRAs, DP keys);
- a minimum mix at each --top-k k (assembly.top_k=k: at least k sharers' pieces at every position).
Every point is kept in OUT/privacy/<point>/ and not redone. Writes benchmarks/results/privacy-NAME.{json,md,png}
and privacy-NAME-{activation,gate}.{json,md,png}. Usage (resumable):

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/privacy_curve.py /tmp/priv/demo demo \\
        --noise 0.03 0.1 0.5 2 --top-k 1 8
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from matplotlib.figure import Figure

from perpcs.bench import Bench, BenchSettings
from perpcs.evaluation import per_query, primary_metric, read_lamp_outputs
from perpcs.pipeline import Run
from perpcs.privacy import PrivacySettings, privacy
from perpcs.stats import bootstrap_ci
from perpcs.utils import read_json, write_json, write_text

RESULTS = Path(__file__).parent / "results"
SETTINGS = PrivacySettings(members=12, nonmembers=48, targets=3)
# the attack each protection is meant to stop, read off each point
KEY_ATTACK, MIX_ATTACK = "key_membership_calibrated", "assembled_calibrated"


def attacked(run: Path, out: Path, oppu: Path | None) -> dict:
    if not (out / "privacy.json").exists():
        privacy(run, out, SETTINGS, oppu_dir=oppu, force=True)  # derived runs have no OPPU: those rows are left out
    return read_json(out / "privacy.json")


def utility(run: Run, out: Path) -> dict:
    """The primary metric of Per-Pcs on the run's targets, with its CI (the bench's generation and scoring)."""
    preds_path = out / "preds" / "perpcs.json"
    if not preds_path.exists():
        Bench(run, BenchSettings(methods=["perpcs"]), out).evaluate()
    task = run.data.task
    golds = read_lamp_outputs(out / "golds.json")[1]
    scores = per_query(task, golds, read_lamp_outputs(preds_path)[1])
    name, higher = primary_metric(task)
    lo, hi = bootstrap_ci(scores.values())
    return {"metric": name, "higher_is_better": higher, "mean": sum(scores.values()) / len(scores), "ci": [lo, hi],
            "n": len(scores)}


def point(bench_out: Path, label: str, overrides: dict) -> dict:
    folder = bench_out / "privacy" / label
    if (folder / "point.json").exists():
        return read_json(folder / "point.json")
    base = Run(bench_out / "run")
    run = base.derive(folder / "run", base.config.updated(overrides))
    run.pipeline()
    result = {"label": label, "settings": overrides, "utility": utility(run, folder),
              "privacy": attacked(run.folder, folder / "attacks", None)}
    del run.merged  # one model in memory at a time
    write_json(folder / "point.json", result)
    return result


def row(p: dict) -> str:
    u, kp = p["utility"], p["privacy"].get("key_privacy")
    eps = f"{kp['epsilon_per_key']:.3g} / {kp['epsilon_all_keys']:.3g}" if kp else "inf"
    cells = [p["label"], eps, f"{u['mean']:.3f} [{u['ci'][0]:.3f}, {u['ci'][1]:.3f}]"]
    for name in (KEY_ATTACK, "key_membership", MIX_ATTACK, "assembled_loss"):
        a = p["privacy"]["attacks"][name]["attack"]
        cells.append(f"{a['auroc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] / {a['tpr_at_1pct_fpr']:.2f}")
    at = p["privacy"]["attribute"]
    cells.append("-" if "skipped" in at else f"{at['accuracy']:.0%} (prior {at['prior_accuracy']:.0%})")
    return "| " + " | ".join(cells) + " |"


def plot(points: list[dict], name: str, path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    groups = [("key_noise (activation keys)", KEY_ATTACK, lambda p: "top_k" not in p["label"]),
              ("minimum mix (assembly.top_k)", MIX_ATTACK, lambda p: not p["label"].startswith("key_noise"))]
    for i, (title, attack, keep) in enumerate(groups):
        ax = fig.add_subplot(1, 2, i + 1)
        for p in filter(keep, points):
            a, u = p["privacy"]["attacks"][attack]["attack"], p["utility"]
            ax.errorbar(a["auroc"], u["mean"], xerr=[[a["auroc"] - a["ci"][0]], [a["ci"][1] - a["auroc"]]],
                        yerr=[[u["mean"] - u["ci"][0]], [u["ci"][1] - u["mean"]]], fmt="o", capsize=3)
            ax.annotate(p["label"], (a["auroc"], u["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axvline(0.5, color="black", lw=0.8, ls=":")
        ax.set_xlabel(f"AUROC of {attack} (95% CI); 0.5 = chance")
        ax.set_ylabel(f"{points[0]['utility']['metric']} (95% CI)")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"privacy/utility on {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_out", type=Path)
    ap.add_argument("name")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.03, 0.1, 0.5, 2.0])
    ap.add_argument("--top-k", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the result files go")
    args = ap.parse_args()
    results = args.results
    torch.set_num_threads(1)
    out, bench = args.bench_out, read_json(args.bench_out / "results.json")
    oppu = out / "run" / "oppu"
    for kind, run in (("activation", out / "run"), ("gate", out / "variants" / "gate" / "run")):
        attacked(run, out / "privacy" / f"keys-{kind}", oppu)
        for suffix in ("json", "md", "png"):
            shutil.copy(out / "privacy" / f"keys-{kind}" / f"privacy.{suffix}",
                        results / f"privacy-{args.name}-{kind}.{suffix}")
    primary = bench["primary_metric"]
    st = bench["statistics"]["methods"]["perpcs"]
    points = [{"label": "none (bench)", "settings": {},
               "privacy": read_json(out / "privacy" / "keys-activation" / "privacy.json"),
               "utility": {"metric": primary["name"], "higher_is_better": primary["higher_is_better"],
                           "mean": st["mean"], "ci": st["ci"], "n": st["n"]}}]
    for z in args.noise:
        points.append(point(out, f"key_noise={z:g}", {"key_noise": z}))
    for k in args.top_k:
        points.append(point(out, f"top_k={k}", {"assembly": {"top_k": k}}))
    head = ["protection", "epsilon per key / all keys (delta 1e-5)", f"Per-Pcs {primary['name']} [95% CI]",
            f"{KEY_ATTACK} AUROC [CI] / TPR@1%FPR", "key_membership", f"{MIX_ATTACK}", "assembled_loss",
            "dominant label from keys"]
    md = [f"# privacy/utility on {args.name} ({bench['task']}, {bench['n_targets']} targets, "
          f"{bench['n_sharers']} sharers)",
          "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *map(row, points), "",
          f"Attacks: `perpcs privacy` with {json.dumps(SETTINGS.model_dump())}; "
          f"OPPU on the same targets: {bench['methods']['oppu']['metrics'][primary['name']]:.3f}, "
          f"non-personalized: {bench['methods']['non_personalized']['metrics'][primary['name']]:.3f}.",
          "", f"![privacy/utility](privacy-{args.name}.png)", ""]
    write_json(results / f"privacy-{args.name}.json", {"bench": str(out), "points": points})
    write_text(results / f"privacy-{args.name}.md", "\n".join(md))
    plot(points, args.name, results / f"privacy-{args.name}.png")
    print("\n".join(md))
    print(f"wrote {results / f'privacy-{args.name}'}.{{json,md,png}}")


if __name__ == "__main__":
    main()
