"""Could a user whose taste group no sharer has be told from the assembly pass itself, and given the task model?

On the synthetic demo the evidence cells show such users get less than the task model. This reads the demo cells'
run folders (benchmarks/evidence.py --out OUT), assembles every target and validation user once more with the run's
rule while recording the key scores, and reports per user its mean (over positions and batches) top score and
top-minus-second score, against its coverage (sharers of its group, from groups.json), the AUC of each for
coverage 0, and what "assemble unless the top score is below t" would score at every t: on validation users (the
calibration's own predictions) and on the targets (the cell's per-query scores).

    OMP_NUM_THREADS=1 python benchmarks/abstain_probe.py --out /work/runs/evidence --seeds 0 1 2
"""

import argparse
import statistics
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from perpcs.assembly import Assembler
from perpcs.evaluation import per_query, resolve_task
from perpcs.pipeline import Run
from perpcs.report import folder_scores
from perpcs.utils import read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def user_scores(cell: Path) -> dict[str, dict]:
    run = Run(cell / "run")
    groups = read_json(Path(run.config.data) / "groups.json")
    sharers = [s.user_id for s in run.select()]
    cal = read_json(run.calibration_path)
    held = cal["validation"]["heldout_items"]
    model, tok = run.merged
    assembler = Assembler.for_run(model, run.open_pool(), run.config, run.rule.assembly)
    out = {}
    try:
        for uid in run.split["targets"] + cal["validation"]["users"]:
            user = run.data.user(uid)
            trace: list = []
            assembler.recipe(run.data.task, tok, user.history[: len(user.history) - held.get(uid, 0)], user.profile,
                             user=uid, trace=trace)
            tops = [torch.sort(s, descending=True).values for batch in trace for ids, s in batch.values()
                    if len(ids) > 1]
            out[uid] = {"role": "validation" if uid in held else "target",
                        "coverage": sum(groups[s] == groups[uid] for s in sharers),
                        "top": statistics.mean(float(t[0]) for t in tops),
                        "gap": statistics.mean(float(t[0] - t[1]) for t in tops)}
            print(cell.name, uid, out[uid], flush=True)
    finally:
        assembler.unload()
    return out


def correct(cell: Path, rule: str) -> dict[str, dict[str, list[float]]]:
    """Per user: the task model's and the rule's per-query scores (validation: calibration's predictions; targets:
    the bench's), each by the task's own per-query metric."""
    cal = read_json(cell / "run" / "calibration.json")
    results = read_json(cell / "results.json")
    task = resolve_task(results["dataset"])
    scores = folder_scores(cell, results["dataset"], ["non_personalized", "perpcs"])
    by_user = [("#", {"none": per_query(task, cal["golds"], cal["predictions"]["none"]),
                      "rule": per_query(task, cal["golds"], cal["predictions"][rule])}),
               ("-q", {"none": scores["non_personalized"], "rule": scores["perpcs"]})]
    per: dict[str, dict[str, list[float]]] = {}
    for sep, columns in by_user:
        for q in columns["rule"]:
            p = per.setdefault(q.rsplit(sep, 1)[0], {"none": [], "rule": []})
            for name, values in columns.items():
                p[name].append(values[q])
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the evidence suite's run folders")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--results", type=Path, default=RESULTS / "abstain-probe.json")
    a = ap.parse_args()
    users, per = {}, {}
    for seed in a.seeds:
        cell = a.out / "demo" / f"seed-{seed}"
        rule = read_json(cell / "run" / "calibration.json")["chosen"]
        users |= {f"{seed}/{u}": v for u, v in user_scores(cell).items()}
        per |= {f"{seed}/{u}": v for u, v in correct(cell, rule).items()}
    uncovered = [v["coverage"] == 0 for v in users.values()]
    auc = {k: roc_auc_score(uncovered, [-v[k] for v in users.values()]) for k in ("top", "gap")}
    print(f"{sum(uncovered)} of {len(users)} users have no sharer of their group; AUC of a low score for them: "
          + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))

    def accuracy(role: str, t: float) -> float:
        picked = [per[u]["none" if users[u]["top"] < t else "rule"] for u in users if users[u]["role"] == role]
        return statistics.mean(x for p in picked for x in p)
    tops = sorted(v["top"] for v in users.values())
    sweep = [{"threshold": t, "validation": accuracy("validation", t), "targets": accuracy("target", t)}
             for t in [tops[0] - 1, *tops, tops[-1] + 1]]  # from "assemble for all" to "abstain for all"
    for s in sweep[:: max(1, len(sweep) // 16)] + sweep[-1:]:
        print(f"abstain below {s['threshold']:7.2f}: validation {s['validation']:.3f}, targets {s['targets']:.3f}")
    write_json(a.results, {"users": users, "auc": auc, "sweep": sweep})
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
