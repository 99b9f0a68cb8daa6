"""Can one backward pass find the sharer that the target's own history loss finds?

`sharer_ceiling.py` showed that on the demo the sharer whose whole LoRA gives the target's history the lowest loss
is nearly always of the target's taste group (81% of OPPU's gain), but finding it costs one forward per candidate
sharer. To first order a sharer's LoRA changes the target's history loss by <G, dW> summed over positions, where
G is the gradient of that loss with respect to the module's weight on the task model and dW = (alpha / r) B A the
sharer's update there: one forward and one backward over the history score every piece of every sharer. This
probe takes that score per sharer (and its scale-free form, the mean over positions of cos(-G, dW)), picks the
best sharer, and compares the pick with the lowest-loss sharer, the target's group and the pick's accuracy on the
target's queries, all from `results/sharer-ceiling.json` (no generation).

    OMP_NUM_THREADS=1 python benchmarks/gradient_probe.py --out /work/runs/evidence --cells demo/0 demo/1 demo/2
"""

import argparse
import statistics
from pathlib import Path

import torch.nn.functional as F
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from perpcs.lora import load_lora
from perpcs.pipeline import Run
from perpcs.training import collate, example_losses, history_examples
from perpcs.utils import read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results"
SCORES = ("first_order", "cosine")


def history_gradients(model, examples, pad_id: int, positions: list[str], batch_size: int = 8) -> dict:
    """{position: dL/dW} of the mean output-token loss over `examples`, on the task model's weights."""
    weights = {p: model.get_submodule(p).weight for p in positions}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        (example_losses(model, batch).sum() / len(examples)).backward()
    grads = {p: w.grad.detach().clone() for p, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    return grads


def gradient_scores(grads: dict, updates: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{kind: {sharer: score}}, larger is better: minus the first-order loss change of the whole LoRA, and the
    mean over positions of the cosine between its update and the loss's descent direction."""
    out = {k: {} for k in SCORES}
    for s, dw in updates.items():
        out["first_order"][s] = -sum(float((grads[p] * dw[p]).sum()) for p in dw)
        out["cosine"][s] = statistics.mean(
            float(F.cosine_similarity(-grads[p].flatten(), dw[p].flatten(), dim=0)) for p in dw)
    return out


def probe(cell: Path, ceiling: dict) -> dict:
    run = Run(cell / "run")
    groups = read_json(Path(run.config.data) / "groups.json")
    model, tok = run.merged
    scale = run.config.lora.alpha / run.config.lora.r
    sharers = [s.user_id for s in run.select()]
    updates = {s: {p: scale * B @ A for p, (A, B) in load_lora(run.sharer_dir(s) / "adapter").items()} for s in sharers}
    positions = sorted(next(iter(updates.values())))
    per_target = {}
    for user in tqdm(run.users(run.split["targets"]), desc=f"{cell.parent.name}/{cell.name}: targets"):
        seen = ceiling[user.user_id]
        examples = history_examples(run.data.task, tok, user.history, run.config.max_len)
        scores = gradient_scores(history_gradients(model, examples, tok.pad_token_id, positions), updates)
        loss = seen["history_loss"]
        row = {"group": groups[user.user_id], "lowest_loss_sharer": seen["lowest_loss_sharer"],
               "lowest_loss_pick": seen["lowest_loss_pick"], "perpcs": seen["perpcs"],
               "non_personalized": seen["non_personalized"], "oppu": seen.get("oppu"), "scores": scores}
        for kind, by in scores.items():
            pick = max(by, key=by.get)
            row[kind] = {"pick": pick, "pick_group_is_own": groups[pick] == groups[user.user_id],
                         "pick_is_lowest_loss": pick == seen["lowest_loss_sharer"], "accuracy": seen["sharers"][pick],
                         "spearman_with_minus_loss": float(spearmanr([by[s] for s in sharers],
                                                                     [-loss[s] for s in sharers]).statistic)}
        per_target[user.user_id] = row
    return per_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the evidence suite's run folders")
    ap.add_argument("--cells", nargs="+", default=["demo/0", "demo/1", "demo/2"], help="SET/SEED of demo cells")
    ap.add_argument("--results", type=Path, default=RESULTS / "gradient-probe.json")
    a = ap.parse_args()
    ceiling = read_json(RESULTS / "sharer-ceiling.json")["cells"]
    every = {spec: probe(a.out / spec.split("/")[0] / f"seed-{spec.split('/')[1]}", ceiling[spec]) for spec in a.cells}
    rows = [t for ts in every.values() for t in ts.values()]
    summary = {"targets": len(rows),
               "accuracy": {"non_personalized": statistics.mean(t["non_personalized"] for t in rows),
                            "perpcs": statistics.mean(t["perpcs"] for t in rows),
                            "lowest_loss_pick": statistics.mean(t["lowest_loss_pick"] for t in rows),
                            **{k: statistics.mean(t[k]["accuracy"] for t in rows) for k in SCORES}}}
    for k in SCORES:
        summary[k] = {"own_group": sum(t[k]["pick_group_is_own"] for t in rows),
                      "is_lowest_loss": sum(t[k]["pick_is_lowest_loss"] for t in rows),
                      "median_spearman_with_minus_loss": statistics.median(t[k]["spearman_with_minus_loss"]
                                                                           for t in rows)}
    write_json(a.results, {"cells": every, "summary": summary})
    print(summary)
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
