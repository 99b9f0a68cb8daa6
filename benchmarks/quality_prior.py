"""Could a sharer-quality signal, measured on other users once per pool, close the demo's gap to OPPU?

On the demo the keys find the target's taste group; what is left is which of the group's sharers (their LoRAs
differ: 0.92 against 0.33 on one target). A quality signal taken on other users (validation users, say) can at
best know how well each sharer's whole LoRA does for the *other* users of the target's group. This bounds that
from above with the truth: the taste groups (groups.json) and the other targets' own query scores
(`results/sharer-ceiling.json`), leave-one-out per target. No model runs.

    python benchmarks/quality_prior.py   # results/quality-prior.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from perpcs.utils import read_json, write_json
from sharer_ceiling import RESULTS, share


def picks(cell: dict) -> dict:
    """Per target: what a quality prior from the cell's other targets would give it, two ways.

    `group_quality_pick`: of the target's group's sharers, the one best on the other targets of its group (none of
    them: the group sharers' mean, a pick with no information); None if the pool has no sharer of its group.
    `anyone_quality_pick`: the sharer best on all the other targets, group or not (quality for anyone)."""
    out = {}
    for uid, t in cell.items():
        same_group = [o for o, u in cell.items() if o != uid and u["group"] == t["group"]]
        others = [o for o in cell if o != uid]

        def quality(sharer: str, users: list[str]) -> float:
            return statistics.mean(cell[o]["sharers"][sharer] for o in users)

        group = t["same_group_sharers"]
        if not group:
            g = None
        elif same_group:
            g = t["sharers"][max(group, key=lambda s: (quality(s, same_group), s))]
        else:
            g = statistics.mean(t["sharers"][s] for s in group)
        anyone = max(t["sharers"], key=lambda s: (quality(s, others), s))
        out[uid] = {**t, "group_quality_pick": g, "anyone_quality_pick": t["sharers"][anyone]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ceiling", type=Path, default=RESULTS / "sharer-ceiling.json")
    ap.add_argument("--results", type=Path, default=RESULTS / "quality-prior.json")
    a = ap.parse_args()
    cells = {c: picks(ts) for c, ts in read_json(a.ceiling)["cells"].items()}
    pooled = {f"{c}/{u}": t for c, ts in cells.items() for u, t in ts.items()}
    rows = ("non_personalized", "perpcs", "group_quality_pick", "anyone_quality_pick", "lowest_loss_pick",
            "best_same_group_sharer")
    # a target whose group has no sharer gets nothing from its group: its non-personalized score
    means = {r: statistics.mean(t["non_personalized"] if t[r] is None else t[r] for t in pooled.values()) for r in rows}
    shares = {r: share(pooled, r) for r in rows[1:]}
    for r in rows:
        print(f"{r}: mean over {len(pooled)} targets {means[r]:.3f}"
              + ("" if r not in shares else f", share of OPPU's gain on OPPU's targets {shares[r]:.0%}"))
    write_json(a.results, {"cells": cells, "mean": means, "share_of_oppu_gain": shares})
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
