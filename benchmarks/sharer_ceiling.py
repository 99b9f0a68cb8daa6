"""What could the pool give a target at best? Every sharer's whole LoRA, scored on every target of the demo cells.

Per-Pcs assembles a target's adapter from sharers' pieces, so the sharers' own LoRAs show what a pool holds: if
even the best sharer's whole LoRA, picked per target by its score on that target's queries (an oracle), falls
short of OPPU, the shortfall is most likely the pool's, not the selection rule's (a mix of pieces may beat every
single LoRA, but the grid's rules mostly give one sharer the weight). The demo knows each user's taste group
(groups.json), so the same is given for the sharers of the target's group (a real set has none: those fields are
empty). Could the target find the right
sharer itself, without its queries? Each sharer's whole LoRA is also scored by its loss on the target's own
history, and the lowest-loss sharer's accuracy is reported: a pick that costs one forward per candidate sharer.
Reads the evidence suite's run folders (benchmarks/evidence.py --out OUT) and the cells' per-query scores
(results/evidence/<set>-seed<n>/scores.json); writes results/sharer-ceiling.json.

    OMP_NUM_THREADS=1 python benchmarks/sharer_ceiling.py --out /work/runs/evidence --cells demo/0 demo/1 demo/2
    OMP_NUM_THREADS=1 python benchmarks/sharer_ceiling.py --out /work/runs/evidence-fresh --cells demo/3 demo/4 \
        --evidence benchmarks/results/evidence-fresh --results benchmarks/results/sharer-ceiling-fresh.json
    OMP_NUM_THREADS=1 python benchmarks/sharer_ceiling.py --out /work/runs/evidence --cells lastfm/0 \
        --results benchmarks/results/sharer-ceiling-lastfm.json
"""

import argparse
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from perpcs.evaluation import per_query
from perpcs.generation import generate
from perpcs.lora import apply_lora, load_lora
from perpcs.pipeline import Run
from perpcs.retrieval import prompts
from perpcs.tasks import answer_budget
from perpcs.training import heldout_loss, history_examples
from perpcs.utils import read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results"
# the cell's rows shown beside the sharers, those it has
ROWS = ("non_personalized", "perpcs", "oppu", "average", "act-cat-tau16", "task-whole", "task-whole3")


def sharer_scores(run: Run, label: str) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """{target: {sharer: {query id: score}}}: each sharer's whole LoRA on each target's queries; and {target:
    {sharer: loss}}: its mean output-token loss on the target's history, which the target could compute itself
    (one forward over its history per sharer, against assembly's one in all)."""
    task, lora = run.data.task, run.config.lora
    model, tok = run.merged
    budget = answer_budget(task, tok)
    targets = run.users(run.split["targets"])
    golds = {q.id: q.output for u in targets for q in u.queries}
    out: dict[str, dict[str, dict[str, float]]] = {u.user_id: {} for u in targets}
    losses: dict[str, dict[str, float]] = {u.user_id: {} for u in targets}
    histories = {u.user_id: history_examples(task, tok, u.history, run.config.max_len) for u in targets}
    for s in tqdm([s.user_id for s in run.select()], desc=f"{label}: sharers"):
        peft = apply_lora(model, lora.model_dump(), lora.r, load_lora(run.sharer_dir(s) / "adapter"))
        try:
            for user in targets:
                texts = generate(peft, tok, prompts(task, user), budget)
                preds = {q.id: task.parse_output(t) for q, t in zip(user.queries, texts)}
                out[user.user_id][s] = per_query(task, {q: golds[q] for q in preds}, preds)
                with torch.no_grad():
                    losses[user.user_id][s] = heldout_loss(peft, histories[user.user_id], tok.pad_token_id)
        finally:
            peft.unload()
    return out, losses


def ceiling(cell: Path, result: Path) -> dict:
    """Per target: its group's sharers, the best sharer (oracle) and the best of its group, next to the bench's rows."""
    run = Run(cell / "run")
    known = Path(run.config.data) / "groups.json"  # synthetic sets only; a real set's targets have no group
    groups = read_json(known) if known.exists() else {}
    rows = read_json(result / "scores.json")  # the cell's per-query scores, by row
    per_target = {}
    scores, losses = sharer_scores(run, f"{cell.parent.name}/{cell.name}")
    for uid, by_sharer in scores.items():
        mean = {s: statistics.mean(v.values()) for s, v in by_sharer.items()}
        same = [s for s in mean if uid in groups and groups[s] == groups[uid]]
        queries = list(next(iter(by_sharer.values())))
        lowest = min(losses[uid], key=losses[uid].get)
        per_target[uid] = {
            "group": groups.get(uid), "same_group_sharers": same, "sharers": mean, "history_loss": losses[uid],
            "best_sharer": max(mean.values()), "best_same_group_sharer": max((mean[s] for s in same), default=None),
            "lowest_loss_sharer": lowest, "lowest_loss_group": groups.get(lowest), "lowest_loss_pick": mean[lowest],
            **{r: statistics.mean(rows[r][q] for q in queries)
               for r in ROWS if r in rows and all(q in rows[r] for q in queries)}}
    return per_target


def share(per_target: dict, row: str) -> float | None:
    """The share of OPPU's gain over non_personalized that `row` reaches on the targets OPPU ran on (equal queries
    per target, so the mean of target means is the mean over queries). A target whose group has no sharer counts
    as no gain for the best of its group: the pool has nothing of its group to give."""
    users = [t for t in per_target.values() if "oppu" in t]
    gain = sum(t["oppu"] - t["non_personalized"] for t in users)
    got = sum(t[row] - t["non_personalized"] for t in users if t[row] is not None)
    return got / gain if users and gain > 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the evidence suite's run folders")
    ap.add_argument("--cells", nargs="+", default=["demo/0", "demo/1", "demo/2"],
                    help="SET/SEED of cells (a real set has no groups)")
    ap.add_argument("--results", type=Path, default=RESULTS / "sharer-ceiling.json")
    ap.add_argument("--evidence", type=Path, default=RESULTS / "evidence", help="the kept cells (as evidence.py)")
    a = ap.parse_args()
    every = {}
    for spec in a.cells:
        name, seed = spec.split("/")
        every[spec] = ceiling(a.out / name / f"seed-{seed}", a.evidence / f"{name}-seed{seed}")
    pooled = {f"{c}/{u}": t for c, ts in every.items() for u, t in ts.items()}
    shares = {r: share(pooled, r) for r in ("perpcs", "best_sharer", "best_same_group_sharer", "lowest_loss_pick")}
    for spec, ts in every.items():
        for uid, t in ts.items():
            print(f"{spec} {uid} group {t['group']} ({len(t['same_group_sharers'])} sharers of it): best sharer "
                  f"{t['best_sharer']:.3f}, best of its group {t['best_same_group_sharer']}, lowest history loss "
                  f"{t['lowest_loss_sharer']} (group {t['lowest_loss_group']}) {t['lowest_loss_pick']:.3f}, "
                  + ", ".join(f"{r} {t[r]:.3f}" for r in ROWS if r in t))
    print("share of OPPU's gain on OPPU's targets: " + ", ".join(
        f"{r} {'-' if v is None else f'{v:.0%}'}" for r, v in shares.items()))
    write_json(a.results, {"cells": every, "share_of_oppu_gain": shares})
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
