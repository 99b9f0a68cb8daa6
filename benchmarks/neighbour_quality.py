"""Can the validation users tell a target which sharer is good for users like it, at one pass per target?

`quality_prior.py` bounds a sharer-quality signal from other users of the target's taste group with the truth.
This measures the signal a pool could have: once per pool, every sharer's whole LoRA answers every validation
user's held-out queries (the users and items calibration scores on); per target, one forward of the task model
over its history gives its key (the mean LN(module input) over the tokens that predict answers, per position),
its nearest validation users by that key (cosine, centred on the validation users' mean, averaged over
positions), and the sharer whose LoRA did best on them. The pick is scored by that sharer's whole LoRA on the
target's own queries (`results/sharer-ceiling.json`), so the target generates nothing.

    OMP_NUM_THREADS=1 python benchmarks/neighbour_quality.py --out /work/runs/evidence --cells demo/0
    OMP_NUM_THREADS=1 python benchmarks/neighbour_quality.py --out /work/runs/evidence --cells lastfm/0 \
        --ceiling benchmarks/results/sharer-ceiling-lastfm.json
    python benchmarks/neighbour_quality.py --summary   # cells in results/neighbour-quality/, pooled
    OMP_NUM_THREADS=1 python benchmarks/neighbour_quality.py --out /work/runs/evidence-fresh --cells demo/3 demo/4 \
        --ceiling benchmarks/results/sharer-ceiling-fresh.json --results benchmarks/results/neighbour-quality-fresh.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from module_inputs import module_inputs
from perpcs.assembly import predict_mask
from perpcs.calibration import validation_users
from perpcs.evaluation import per_query
from perpcs.generation import generate
from perpcs.lora import apply_lora, load_lora
from perpcs.pipeline import Run
from perpcs.tasks import answer_budget
from perpcs.training import history_examples
from perpcs.utils import read_json, write_json
from sharer_ceiling import RESULTS, share

NEIGHBOURS = (1, 3, 5)
KEY_ITEMS = 64  # the newest items a key reads, as the whole-pick rules


@torch.no_grad()
def user_key(model, run: Run, items, positions: list[str]) -> dict[str, torch.Tensor]:
    """{position: mean LN(input) over the tokens that predict an answer token}, on the task model."""
    tok = run.merged[1]
    examples = history_examples(run.data.task, tok, items[-KEY_ITEMS:], run.config.max_len)
    sums = {p: 0.0 for p in positions}
    count = 0
    for labels, _, seen in module_inputs(model, examples, positions, tok.pad_token_id):
        mask = predict_mask(labels).unsqueeze(-1).float()
        for p, h in seen.items():
            sums[p] = sums[p] + (h * mask).sum((0, 1))
        count += int(mask.sum())
    return {p: s / count for p, s in sums.items()}


def similarity(a: dict, b: dict, centre: dict) -> float:
    return statistics.mean(F.cosine_similarity(a[p] - centre[p], b[p] - centre[p], dim=0).item() for p in a)


def cell(folder: Path, ceiling: dict) -> dict:
    run = Run(folder / "run")
    task = run.data.task
    model, tok = run.merged
    model.eval()
    sharers = [s.user_id for s in run.select()]
    users = validation_users(run.users(run.split["candidates"]), set(sharers), run.config.calibration)
    if [u.user_id for u in users] != read_json(run.calibration_path)["validation"]["users"]:
        raise SystemExit(f"{folder}: these are not the validation users its calibration scored on")
    positions = sorted(load_lora(run.sharer_dir(sharers[0]) / "adapter"))
    keys = {u.user_id: user_key(model, run, u.context, positions)
            for u in tqdm(users, desc=f"{folder.name}: validation keys")}
    targets = run.users(run.split["targets"])
    tkeys = {t.user_id: user_key(model, run, t.history, positions) for t in tqdm(targets, desc="target keys")}
    centre = {p: torch.stack([k[p] for k in keys.values()]).mean(0) for p in positions}
    budget = answer_budget(task, tok)
    quality: dict[str, dict[str, float]] = {u.user_id: {} for u in users}  # validation user -> sharer -> mean score
    for s in tqdm(sharers, desc=f"{folder.name}: sharers on validation users"):
        lora = run.config.lora
        peft = apply_lora(model, lora.model_dump(), lora.r, load_lora(run.sharer_dir(s) / "adapter"))
        try:
            for u in users:
                texts = generate(peft, tok, [task.format_prompt(it.input) for it in u.heldout], budget)
                golds = {str(i): it.output for i, it in enumerate(u.heldout)}
                preds = {str(i): task.parse_output(t) for i, t in enumerate(texts)}
                quality[u.user_id][s] = statistics.mean(per_query(task, golds, preds).values())
        finally:
            peft.unload()
    out = {}
    for t in targets:
        near = sorted(keys, key=lambda v: (-similarity(tkeys[t.user_id], keys[v], centre), v))
        row = {**ceiling[t.user_id], "neighbours": near[: max(NEIGHBOURS)]}
        for k in NEIGHBOURS:
            predicted = {s: statistics.mean(quality[v][s] for v in near[:k]) for s in sharers}
            pick = max(sharers, key=lambda s: (predicted[s], s))
            row[f"neighbours_{k}"] = {"pick": pick, "predicted": predicted, "accuracy": row["sharers"][pick]}
            row[f"neighbours_{k}_pick"] = row["sharers"][pick]
        out[t.user_id] = row
    return {"validation_users": [u.user_id for u in users], "quality": quality, "targets": out}


def cells_dir(results: Path) -> Path:
    """One file per cell beside the pooled results (results/neighbour-quality/ for results/neighbour-quality.json),
    so workers on other cells write apart."""
    return results.with_suffix("")


def summary(path: Path) -> dict:
    """Per set, its cells' targets pooled: mean of each pick and its share of OPPU's gain on OPPU's targets."""
    every = {"cells": {f.stem.replace("-seed", "/"): read_json(f) for f in sorted(cells_dir(path).glob("*.json"))},
             "sets": {}}
    rows = ["non_personalized", "perpcs", "lowest_loss_pick", *(f"neighbours_{k}_pick" for k in NEIGHBOURS)]
    for name in sorted({c.split("/")[0] for c in every["cells"]}):
        pooled = {f"{c}/{u}": t for c, got in every["cells"].items() if c.split("/")[0] == name
                  for u, t in got["targets"].items()}
        got = every["sets"][name] = {"targets": len(pooled),
                                     "mean": {r: statistics.mean(t[r] for t in pooled.values()) for r in rows},
                                     "share_of_oppu_gain": {r: share(pooled, r) for r in rows[1:]}}
        for r in rows:
            gain = got["share_of_oppu_gain"].get(r)
            print(f"{name}: {r}: {got['mean'][r]:.3f} over {len(pooled)} targets"
                  + ("" if gain is None else f", {gain:.0%} of OPPU's gain"))
    write_json(path, every)
    print(f"wrote {path}")
    return every


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the evidence suite's run folders")
    ap.add_argument("--cells", nargs="*", default=[], help="SET/SEED of cells with a sharer-ceiling entry")
    ap.add_argument("--ceiling", type=Path, default=RESULTS / "sharer-ceiling.json", help="sharer_ceiling.py's results")
    ap.add_argument("--results", type=Path, default=RESULTS / "neighbour-quality.json")
    ap.add_argument("--summary", action="store_true", help="pool the cells in --results and print the shares")
    a = ap.parse_args()
    ceiling = read_json(a.ceiling)["cells"]
    for spec in a.cells:
        if spec not in ceiling:
            raise SystemExit(f"--cells {spec}: not in {a.ceiling} (run sharer_ceiling.py first)")
        name, seed = spec.split("/")
        path = cells_dir(a.results) / f"{name}-seed{seed}.json"
        write_json(path, cell(a.out / name / f"seed-{seed}", ceiling[spec]))
        print(f"{spec}: wrote {path}")
    if a.summary:
        summary(a.results)


if __name__ == "__main__":
    main()
