"""Do keys that see which answer goes with which input find the target's taste group better than mean keys?

The activation keys are a user's mean LN(h) over the tokens that predict its answers. On the demo every user
describes the same kind of movies and only the tags differ, so two groups that use the tags equally often but
for different movies have nearly the same mean: the mean sees the answers, not the mapping from inputs to
answers. The target's history loss sees the mapping, and on the demo the lowest-loss sharer is nearly always of
the target's group (`sharer_ceiling.py`), at one forward per sharer. A key that keeps the mapping at one forward:
per example, u = LN(h) at the token that predicts the first answer token (the input, read to its end) and
v = mean LN(h) over the answer tokens that predict the next one (the answer in its context), both centred on
the sharers' means; the key is the mean over examples of the outer product of their random projections to `k`
dimensions, the input-answer cross-covariance. A quadratic statistic, so it costs the same one forward.

For every user of the demo cells with a known group (the non-sharer candidates and the targets) this runs the
task model once over the user's history (no LoRA) and scores each sharer by the mean over positions of the
cosine of centred keys, for four keys: the mean over the tokens that predict answers, the mean over answer tokens
only, and the cross-covariance, each a sharer's on the task model like the user's, and the pool's own keys (the
sharer's mean with its LoRA on, as assembly compares them). It reports how often the top sharer is of the user's group
and, on the targets, the accuracy of that sharer's whole LoRA (from `results/sharer-ceiling.json`).

    OMP_NUM_THREADS=1 python benchmarks/key_probe.py --out /work/runs/evidence --cells demo/0 demo/1 demo/2
"""

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from module_inputs import module_inputs
from perpcs.assembly import predict_mask
from perpcs.keyindex import KeyIndex
from perpcs.pipeline import Run
from perpcs.training import IGNORE, history_examples
from perpcs.utils import read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("mean", "answer_mean", "cross", "pool")


@torch.no_grad()
def example_stats(model, examples, positions: list[str], pad_id: int, batch_size: int = 16) -> dict:
    """{position: (predict-token means, input ends u, answer means v)}, each [examples, d]: examples without an
    answer token that predicts another (a one-token answer has its EOS) give v = their input end."""
    got: dict[str, list] = {p: [] for p in positions}
    for labels, _, seen in module_inputs(model, examples, positions, pad_id, batch_size):
        predict = predict_mask(labels)
        end = predict & (labels == IGNORE)  # predicts the first answer token
        answer = predict & (labels != IGNORE)
        answer = torch.where(answer.any(1, keepdim=True), answer, end)
        for pos, h in seen.items():
            got[pos].append([(h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True) for m in (predict, end, answer)])
    return {p: tuple(torch.cat([b[j] for b in batches]) for j in range(3)) for p, batches in got.items()}


def user_keys(stats: dict, centre: dict, proj: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{key kind: {position: key}} of one user; `centre`: {position: (mean u, mean v)} of the sharers' examples."""
    out = {k: {} for k in KEYS}
    for p, (pred, u, v) in stats.items():
        out["mean"][p] = out["pool"][p] = pred.mean(0)
        out["answer_mean"][p] = v.mean(0)
        a, b = (u - centre[p][0]) @ proj.T, (v - centre[p][1]) @ proj.T
        out["cross"][p] = (a.T @ b / len(a)).flatten()
    return out


def sharer_scores(target: dict, sharers: dict[str, dict]) -> dict[str, float]:
    """Mean over positions of cos(target - c, sharer - c), c the sharers' mean key (as assembly centres)."""
    ids = list(sharers)
    total = torch.zeros(len(ids))
    for p, t in target.items():
        keys = torch.stack([sharers[s][p] for s in ids])
        c = keys.mean(0)
        total += F.cosine_similarity((t - c).unsqueeze(0), keys - c, dim=-1)
    return {s: float(x) / len(target) for s, x in zip(ids, total)}


def probe(cell: Path, ceiling: dict, k: int, seed: int) -> dict:
    run = Run(cell / "run")
    groups = read_json(Path(run.config.data) / "groups.json")
    model, tok = run.merged
    model.eval()
    positions = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "o_proj")]
    sharers = [s.user_id for s in run.select()]
    probes = [u for u in run.split["candidates"] if u not in sharers] + list(run.split["targets"])
    stats = {}
    for uid in tqdm(sharers + probes, desc=f"{cell.parent.name}/{cell.name}: users"):
        user = run.data.user(uid)
        stats[uid] = example_stats(model, history_examples(run.data.task, tok, user.history, run.config.max_len),
                                   positions, tok.pad_token_id)
    centre = {p: tuple(torch.cat([stats[s][p][j] for s in sharers]).mean(0) for j in (1, 2)) for p in positions}
    d = next(iter(centre.values()))[0].numel()
    proj = torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) / d ** 0.5
    keys = {uid: user_keys(stats[uid], centre, proj) for uid in stats}
    pool = run.key_pool("activation")
    user_of = {pool.pseudonym(s): s for s in sharers}
    index = KeyIndex.of(pool)
    for p in positions:  # the pool's own keys: each sharer's mean with its LoRA on (the method's), not the task model's
        ids, rows = index.keys(p)
        for sid, row in zip(ids, rows):
            keys[user_of[sid]]["pool"][p] = row.float()
    per_user = {}
    for uid in probes:
        row = {"group": groups[uid], "target": uid in ceiling,
               "own_group_sharers": sum(groups[s] == groups[uid] for s in sharers)}
        for kind in KEYS:
            scores = sharer_scores(keys[uid][kind], {s: keys[s][kind] for s in sharers})
            pick = max(scores, key=scores.get)
            row[kind] = {"pick": pick, "own_group": groups[pick] == groups[uid], "scores": scores}
            if uid in ceiling:
                row[kind]["accuracy"] = ceiling[uid]["sharers"][pick]
        if uid in ceiling:
            row["lowest_loss_pick"] = ceiling[uid]["lowest_loss_pick"]
            row["perpcs"] = ceiling[uid]["perpcs"]
        per_user[uid] = row
    return {"sharers": len(sharers), "users": per_user}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the evidence suite's run folders")
    ap.add_argument("--cells", nargs="+", default=["demo/0", "demo/1", "demo/2"], help="SET/SEED of demo cells")
    ap.add_argument("--k", type=int, default=32, help="projection size of the cross-covariance key (k x k)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random projection")
    ap.add_argument("--results", type=Path, default=RESULTS / "key-probe.json")
    a = ap.parse_args()
    if a.k < 1:
        raise SystemExit(f"--k {a.k}: must be at least 1")
    ceiling = read_json(RESULTS / "sharer-ceiling.json")["cells"]
    every = {spec: probe(a.out / spec.split("/")[0] / f"seed-{spec.split('/')[1]}", ceiling.get(spec, {}), a.k, a.seed)
             for spec in a.cells}
    users = [u for c in every.values() for u in c["users"].values() if u["own_group_sharers"]]
    targets = [u for c in every.values() for u in c["users"].values() if u["target"]]  # with a group sharer or not
    summary = {"users_with_a_group_sharer": len(users), "targets": len(targets),
               "chance_own_group": statistics.mean(u["own_group_sharers"] / c["sharers"] for c in every.values()
                                                   for u in c["users"].values() if u["own_group_sharers"])}
    for kind in KEYS:
        summary[kind] = {"own_group": sum(u[kind]["own_group"] for u in users),
                         "own_group_targets": sum(u[kind]["own_group"] for u in targets if u["own_group_sharers"]),
                         "target_accuracy": statistics.mean(u[kind]["accuracy"] for u in targets) if targets else None}
    if targets:
        summary["lowest_loss_pick_accuracy"] = statistics.mean(u["lowest_loss_pick"] for u in targets)
        summary["assembled_accuracy"] = statistics.mean(u["perpcs"] for u in targets)
    write_json(a.results, {"params": {"k": a.k, "seed": a.seed}, "cells": every, "summary": summary})
    print(summary)
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
