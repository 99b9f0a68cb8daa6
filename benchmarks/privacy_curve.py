"""Privacy against utility: `perpcs privacy` on a finished bench, and on runs derived from it with
protection at several strengths, each with the bench's primary metric (95% bootstrap CI over queries).

From a bench output made with `--methods non_personalized --methods oppu --methods perpcs` (or an evidence
cell), every point assembles with the bench's own selection rule (the calibrated one, fixed; or --rule NAME,
a rule of calibration's grid, where the pool declined and so assembles nothing), changing only:
- the paper's gates as keys (a run derived with key=gate: the same sharers and LoRAs);
- `key_noise` at each --noise z (a run derived with key_noise=z: the same sharer LoRAs, DP keys);
- a minimum mix at each --top-k k (assembly.top_k=k: k sharers' pieces at every position), and any other
  --point NAME:KEY=VALUE,... (e.g. average:assembly.select=all: every sharer, equal weights);
- DP-SGD sharer LoRAs at each --dp-noise z (sharer_train.dp_noise=z: every sharer trained again);
each point with Per-Pcs's metric on the bench's queries (kept in OUT/privacy/<point>/, not redone); then one
`perpcs privacy` pass over the bench's run with the gate, key_noise and top_k points as views (same sharers and
LoRAs, so one forward pass per sharer scores every pool's keys), and one pass per DP-SGD point (other LoRAs),
the bench's OPPU adapters as references. Writes benchmarks/results/privacy-NAME.{json,md,png} (the curve) and
privacy-NAME-attacks.{json,md,png}. Usage:

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/privacy_curve.py /tmp/priv/demo demo \\
        --noise 0.03 0.1 0.5 2 --top-k 1 8 --dp-noise 0.5 1 2
"""

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch
from matplotlib.figure import Figure

from perpcs.bench import Bench
from perpcs.evaluation import per_query, primary_metric, read_lamp_outputs
from perpcs.overrides import parse_variants
from perpcs.pipeline import Run
from perpcs.privacy import PrivacySettings, privacy
from perpcs.rules import GRID, RULE_FIELDS
from perpcs.settings import BenchSettings
from perpcs.stats import bootstrap_ci
from perpcs.utils import deep_merge, read_json, write_json, write_text

RESULTS = Path(__file__).parent / "results"
# sized for 2 shared CPU cores: 3 sharers' pieces and keys attacked (every key scores), 1 target's recipe
SETTINGS = PrivacySettings(members=8, nonmembers=32, targets=1, sharers=3)
# the attack each protection is meant to stop, read off each point
KEY_ATTACK, MIX_ATTACK, PIECE_ATTACK = "key_membership_calibrated", "assembled_calibrated", "piece_loss"
COLUMNS = (KEY_ATTACK, "key_membership", MIX_ATTACK, "assembled_loss", PIECE_ATTACK, "piece_calibrated")


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


def fixed_rule(run: Run, name: str | None = None) -> dict:
    """The run's selection rule (the one calibration chose, if on), or the grid rule `name`, as settings,
    calibration off: every point assembles as the bench's Per-Pcs did, apart from what the point changes."""
    if name:
        return deep_merge(copy.deepcopy(GRID[name]), {"calibration": {"enabled": False}})  # merges in place
    rule = run.rule
    return {"key": rule.key, "assembly": {f: getattr(rule.assembly, f) for f in RULE_FIELDS["assembly"]},
            "calibration": {"enabled": False}}


def point(bench_out: Path, label: str, overrides: dict, rule: str | None = None) -> Path:
    """A run derived from the bench's with its rule (or `rule`) and `overrides`, finished, and its utility
    (kept: not redone)."""
    folder = bench_out / "privacy" / (label if rule is None else f"{rule}/{label}")
    if not (folder / "utility.json").exists():
        base = Run(bench_out / "run")
        run = base.derive(folder / "run", base.config.updated(deep_merge(fixed_rule(base, rule), overrides)))
        run.pipeline()
        write_json(folder / "utility.json", {"settings": overrides, "utility": utility(run, folder)})
        del run.merged  # one model in memory at a time
    return folder


def row(p: dict) -> str:
    u, kp, lp = p["utility"], p["privacy"].get("key_privacy"), p["privacy"].get("lora_privacy")
    eps = f"{kp['epsilon_per_key']:.3g} / {kp['epsilon_all_keys']:.3g}" if kp else "inf"
    cells = [p["label"], eps, f"{lp['epsilon']:.3g}" if lp else "inf",
             f"{u['mean']:.3f} [{u['ci'][0]:.3f}, {u['ci'][1]:.3f}]"]
    for name in COLUMNS:
        a = p["privacy"]["attacks"].get(name, {}).get("attack")
        cells.append("-" if not a else f"{a['auroc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] / "
                     f"{a['tpr_at_1pct_fpr']:.2f}")
    at = p["privacy"]["attribute"]
    cells.append("-" if "skipped" in at else f"{at['accuracy']:.0%} (prior {at['prior_accuracy']:.0%})")
    return "| " + " | ".join(cells) + " |"


GROUPS = [("keys: activation, gates, key_noise", KEY_ATTACK, lambda label: label.startswith(("none", "gate", "key_"))),
          ("minimum mix (assembly.top_k, --point)", MIX_ATTACK,
           lambda label: not label.startswith(("gate", "key_", "dp_noise"))),
          ("DP-SGD sharer LoRAs (sharer_train.dp_noise)", PIECE_ATTACK,
           lambda label: label.startswith(("dp_noise", "none")))]


def plot(points: list[dict], name: str, path: Path) -> None:
    groups = [g for g in GROUPS if sum(g[2](p["label"]) for p in points) > 1]
    if not groups:
        return
    fig = Figure(figsize=(5 * len(groups), 4))
    for i, (title, attack, keep) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for p in filter(lambda p: keep(p["label"]) and attack in p["privacy"]["attacks"], points):
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


def attacked(run_dir: Path, out: Path, oppu: Path, views: dict[str, Path] | None = None) -> dict:
    """`perpcs privacy` on a run (and views of it), kept: redone only if the views changed."""
    if (out / "privacy.json").exists():
        found = read_json(out / "privacy.json")
        if set(found.get("views", {})) == set(views or {}):
            return found
    return privacy(run_dir, out, SETTINGS, oppu_dir=oppu, force=True, views=views,
                   assembled_views={n for n in views or {} if not n.startswith("key_noise")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_out", type=Path)
    ap.add_argument("name")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.03, 0.1, 0.5, 2.0])
    ap.add_argument("--top-k", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--dp-noise", type=float, nargs="*", default=[], help="DP-SGD noise multipliers of sharer LoRAs")
    ap.add_argument("--point", nargs="*", default=[], help="NAME:KEY=VALUE,... other assembly points")
    ap.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True, help="the gate-key point")
    ap.add_argument("--rule", choices=[n for n in GRID if n != "none"],
                    help="assemble every point with this rule of the grid, not the bench's: where calibration "
                         "declined, the bench assembles nothing and no protection could change its utility")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the result files go")
    ap.add_argument("--points-only", action="store_true", help="make these points and stop (to run them in parallel)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out, results = args.bench_out, args.results
    specs = {**({"gate keys": {"key": "gate"}} if args.gate else {}),
             **{f"key_noise={z:g}": {"key": "activation", "key_noise": z} for z in args.noise},
             **{f"top_k={k}": {"assembly": {"top_k": k}} for k in args.top_k}, **parse_variants(args.point)}
    dp_specs = {f"dp_noise={z:g}": {"sharer_train": {"dp_noise": z}} for z in args.dp_noise}
    folders = {name: point(out, name.replace(" ", "-"), spec, args.rule) for name, spec in specs.items()}
    dp_folders = {name: point(out, name, spec, args.rule) for name, spec in dp_specs.items()}
    # the unprotected point: the bench's own Per-Pcs, or a run derived with --rule
    base = out / "privacy" / "none" if args.rule is None else point(out, "none", {}, args.rule)
    if args.points_only:
        return
    oppu = out / "run" / "oppu"
    base_run = out / "run" if args.rule is None else base / "run"
    attacks = base.parent / "attacks"
    found = attacked(base_run, attacks, oppu, {name: f / "run" for name, f in folders.items()})
    for suffix in ("json", "png"):
        shutil.copy(attacks / f"privacy.{suffix}", results / f"privacy-{args.name}-attacks.{suffix}")
    write_text(results / f"privacy-{args.name}-attacks.md", (attacks / "privacy.md").read_text().replace(
        "(privacy.png)", f"(privacy-{args.name}-attacks.png)"))
    if not (base / "utility.json").exists():  # the bench's own Per-Pcs, scored (generated here if the bench has not)
        scored = out if (out / "preds" / "perpcs.json").exists() and (out / "golds.json").exists() else base
        write_json(base / "utility.json", {"settings": {}, "utility": utility(Run(out / "run"), scored)})
    points = [{"label": "none", "privacy": found, **read_json(base / "utility.json")}]
    points += [{"label": name, "privacy": found["views"][name], **read_json(f / "utility.json")}
               for name, f in folders.items()]
    points += [{"label": name, "privacy": attacked(f / "run", f / "attacks", oppu), **read_json(f / "utility.json")}
               for name, f in dp_folders.items()]
    metric = points[0]["utility"]["metric"]
    head = ["protection", "key epsilon per key / all keys (delta 1e-5)", "LoRA epsilon (DP-SGD, delta 1e-5)",
            f"Per-Pcs {metric} [95% CI]", *(f"{c} AUROC [CI] / TPR@1%FPR" for c in COLUMNS),
            "dominant label from keys"]
    run = Run(base_run)
    rule = f"--rule {args.rule}" if args.rule else "of the bench"
    md = [f"# privacy/utility on {args.name} ({run.data.task.name}, {len(run.split['targets'])} targets, "
          f"{len(run.select())} sharers)",
          "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *map(row, points), "",
          f"Attacks: `perpcs privacy` with {json.dumps(SETTINGS.model_dump())} (all attacks: "
          f"privacy-{args.name}-attacks.md); utility: Per-Pcs's {metric} on the run's targets' queries, with the "
          f"selection rule {rule} ({json.dumps(fixed_rule(run))}). Key and mix points share the bench's LoRAs "
          "(their piece attacks are the bench's: '-'); DP-SGD points have their own.",
          "", f"![privacy/utility](privacy-{args.name}.png)", ""]
    write_json(results / f"privacy-{args.name}.json", {"bench": str(out), "points": points})
    write_text(results / f"privacy-{args.name}.md", "\n".join(md))
    plot(points, args.name, results / f"privacy-{args.name}.png")
    print("\n".join(md))
    print(f"wrote {results / f'privacy-{args.name}'}.json, .md" + (", .png" if len(points) > 1 else ""))


if __name__ == "__main__":
    main()
