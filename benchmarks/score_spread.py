"""Diagnostic: do piece scores depend on the target user, or only on the piece?

Re-runs assembly for every target user of a finished run with a trace, then, per position,
compares the spread of scores across sharers (same target) with the spread across targets
(same sharer), and counts the positions where every target gets the same top-k. If scores barely
move with the target, every target is given the same mixture of pieces. Usage:

    python benchmarks/score_spread.py RUN
"""

import statistics
import sys

import torch

from perpcs.assembly import Assembler
from perpcs.pipeline import Run


def main(folder: str) -> None:
    run = Run(folder)
    model, tok = run.merged
    pool = run.open_pool()
    assembler = Assembler.for_run(model, pool, run.config)
    scores = {}  # target -> position -> score vector (first history batch)
    for uid in run.split["targets"]:
        user = run.data.user(uid)
        trace: list = []
        assembler.assemble(assembler.examples(run.data.task, tok, user.history, user.profile), tok.pad_token_id, trace)
        scores[uid] = {pos: s for pos, (_, s) in trace[0].items()}
    assembler.unload()
    k = run.config.assembly.top_k
    across_sharers, across_targets, same_topk = [], [], 0
    for pos in pool.positions:
        m = torch.stack([scores[u][pos] for u in scores])  # [targets, sharers]
        across_sharers.append(m.std(1).mean().item())
        across_targets.append(m.std(0).mean().item())
        tops = {tuple(sorted(torch.topk(row, min(k, row.numel())).indices.tolist())) for row in m}
        same_topk += len(tops) == 1
    print(f"{len(scores)} targets, {len(pool)} sharers, {len(pool.positions)} positions")
    print(f"mean std of scores across sharers (same target): {statistics.mean(across_sharers):.4f}")
    print(f"mean std of scores across targets (same sharer): {statistics.mean(across_targets):.4f}")
    print(f"positions where every target gets the same top-{k}: {same_topk} of {len(pool.positions)}")


if __name__ == "__main__":
    main(sys.argv[1])
