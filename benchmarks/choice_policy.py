"""Is calibration's choice what keeps the calibrated default from OPPU, or is it the grid and the pool?

Reads the evidence cells (benchmarks/results/evidence/<set>-seed<n>/, no model runs) and scores, per set over its
seeds, four ways of picking one rule of the grid per seed, each with the targets' per-query scores the cells
already hold (every rule of the grid ran on the targets):
- `calibrated`: calibration's choice (the simplest rule tied with the validation users' best; the `perpcs` row);
- `validation best`: the validation users' best rule outright, no tie-break (none where calibration declined);
- `softest tied`: of the rules tied with that best, the one whose weights are spread over the most sharers (a tie
  broken toward `average` rather than toward the grid's first rule, which is `act-cat` among these);
- `targets' best`: the rule best on the targets themselves. An oracle no pool can have: the most any choice of
  this grid could give, so a gap to OPPU that it leaves is the grid's and the pool's, not the choice's.

And where calibration declined although a fixed rule beat the task model on the targets: could it have seen that?
For the sets whose calibration test is the sign test (ratings, generation), the targets' best fixed rule's wins,
losses and ties against non_personalized are resampled at several numbers of validation queries, and the power is
the share of draws in which calibration's test (Holm over the grid's rules, at its worst: p times their number)
would have let that rule beat "none".

And, with `--probe LABEL`, two more: the choice of a calibration run again on the same pools with other settings
(`benchmarks/calibration_power.py`, e.g. more validation queries), over all its rules and over the default grid's
only, for the sets it covered at every seed.

    python benchmarks/choice_policy.py [--probe grid-q384] [--out NAME]   # results/evidence/NAME.{md,json}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from evidence import ALL, POOL_CHECKS, RESULTS, ROOT, SETS, _pooled, finished_cells
from perpcs.stats import method_statistics, paired
from perpcs.utils import read_json, write_json, write_text

POLICIES = ("calibrated", "validation best", "softest tied", "targets' best")
# `softest tied`'s order: the rules tied with the validation users' best, the one that spreads the weight most first
# (every sharer equal, then tau 16, 4, then tau 1 at half strength, the exact mixes, one sharer, trained gates)
SOFTEST_FIRST = ("average", "act-cat-tau16", "act-cat-tau4", "act-cat-half", "act-cat", "act-linear", "act-top1",
                 "paper")
PROBE_POLICIES = {"probe": "chosen", "probe, default grid": "chosen_in_grid"}  # policy -> calibration-power field
DRAWS = 2000  # resamples per power estimate
SIZES = (16, 64, 256, 1024)  # validation queries per seed at which the power is estimated


def picks(run: dict, probe: dict[str, str] | None = None) -> dict[str, str]:
    """Per policy, the method row (a grid rule or non_personalized) that it picks for this seed; `probe`: the
    rules that a calibration run again with other settings chose, by policy, if any."""
    cal = run["calibration"]
    sign = 1 if run["primary_metric"]["higher_is_better"] else -1
    primary = run["primary_metric"]["name"]
    rows = {n: "non_personalized" if n == "none" else n for n in cal["candidates"]}
    oracle = max((n for n in rows if rows[n] in run["methods"]),
                 key=lambda n: sign * run["methods"][rows[n]]["metrics"][primary])
    tied = cal.get("tied_with_best") or ["none"]
    softest = min(tied, key=lambda n: SOFTEST_FIRST.index(n) if n in SOFTEST_FIRST else len(SOFTEST_FIRST))
    return {"calibrated": rows[cal["chosen"]], "validation best": rows[cal.get("best") or "none"],
            "softest tied": rows[softest], "targets' best": rows[oracle]} | {
        p: rows.get(rule, rule) for p, rule in (probe or {}).items()}


def policy_set(pooled: dict[str, dict[str, float]], runs: list[dict], probes: list[dict] | None = None) -> dict:
    """Each policy's picks over the set's seeds, and its mean, paired test and share of OPPU's gain (the bench's
    `method_statistics`, with each policy as a row). `probes`: a probe's choice per seed, if it covered them all."""
    higher = runs[0]["primary_metric"]["higher_is_better"]
    policies = POLICIES + (tuple(PROBE_POLICIES) if probes else ())
    out = {"seeds": [r["seed"] for r in runs], "picks": {p: [] for p in policies}, "policies": {}}
    scores: dict[str, dict[str, float]] = {p: {} for p in policies}
    for run, probe in zip(runs, probes or [None] * len(runs)):
        for policy, row in picks(run, probe).items():
            out["picks"][policy].append(row)
            scores[policy].update({q: v for q, v in pooled[row].items() if q.split("/")[0] == str(run["seed"])})
    # the calibrated policy must reproduce the suite's own `perpcs` row, or the picks are read wrong
    assert scores["calibrated"] == pooled["perpcs"], "calibrated picks do not match the perpcs row"
    st = method_statistics({**pooled, **scores}, higher)
    vs_oppu = st["oppu"]["vs"]["non_personalized"] if "oppu" in st else None
    out["oppu_beats_np"] = bool(vs_oppu and (vs_oppu["diff"] > 0) == higher and vs_oppu["p"] < 0.05)
    out["policies"] = {p: {"mean": st[p]["mean"], "n": st[p]["n"], "vs_np": st[p]["vs"]["non_personalized"],
                           "vs_calibrated": paired(scores[p], scores["calibrated"], higher),
                           "gain_share": st[p]["gain_share"]} for p in policies}
    return out


def power(pooled: dict[str, dict[str, float]], runs: list[dict], sizes=SIZES, rule: str | None = None,
          seed: int = 0) -> dict | None:
    """How often calibration's test would let the targets' best fixed rule (or `rule`, e.g. "oppu": a rule as good
    as it) beat "none" at n validation queries; and, as the most any test could give, the same rule named in
    advance, with no correction for the others."""
    if runs[0]["kind"] == "classification":  # classification is tested by a bootstrap of macro-F1
        return None
    higher = runs[0]["primary_metric"]["higher_is_better"]
    rules = [n for n in runs[0]["calibration"]["candidates"] if n != "none" and n in pooled]
    best = rule or max(rules, key=lambda n: (1 if higher else -1) * sum(pooled[n].values()))
    if best not in pooled:
        return None
    vs = paired(pooled[best], pooled["non_personalized"], higher)
    rates = np.array([vs["wins"], vs["losses"], vs["ties"]]) / vs["n"]
    used = max(r["calibration"]["validation"]["queries"] for r in runs)
    rng = np.random.default_rng(seed)
    table, alone = {}, {}
    for n in sorted({used, *sizes}):
        hits = hits_alone = 0
        for wins, losses, _ in rng.multinomial(n, rates, size=DRAWS):
            p = binomtest(wins, wins + losses).pvalue if wins > losses else 1.0
            hits += p * len(rules) < 0.05
            hits_alone += p < 0.05
        table[n], alone[n] = hits / DRAWS, hits_alone / DRAWS
    return {"rule": best, "vs_np": vs, "validation_queries_used": used, "holm_over": len(rules), "power": table,
            "power_one_rule": alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", help="a label of benchmarks/results/calibration-power.json: its choices as policies")
    ap.add_argument("--probes", type=Path, default=ROOT / "results" / "calibration-power.json")
    ap.add_argument("--out", default="choice-policy", help="the results' name: results/evidence/OUT.{md,json}")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), metavar="N",
                    help="validation queries per seed at which the power is estimated")
    a = ap.parse_args()
    if min(a.sizes) < 1:
        ap.error(f"--sizes {min(a.sizes)}: a number of validation queries is at least 1")
    probed = read_json(a.probes) if a.probe else {}
    sets, powers = {}, {}
    for name in ALL:
        if not (cells := finished_cells(name)):
            continue
        _, pooled = _pooled(cells)
        runs = [read_json(c / "results.json") for c in cells]
        rows = [probed.get(f"{name}/{r['seed']} {a.probe}") for r in runs]
        probes = [{p: row[field] for p, field in PROBE_POLICIES.items()} for row in rows] if all(rows) else None
        sets[name] = policy_set(pooled, runs, probes)
        for rule in (None, "oppu"):
            if name in SETS and (p := power(pooled, runs, a.sizes, rule)):
                powers[f"{name}, as good as oppu" if rule else name] = p
    lines = ["# Calibration's choice against the validation users' best and the targets' own best",
             "", "From the evidence cells (`python benchmarks/choice_policy.py`); each policy picks one rule of the "
             "grid per seed and is scored on all the set's target queries, paired with non_personalized (sign test). "
             "`targets' best` is an oracle: the most any choice of this grid could give."
             + (f" `probe`: calibration's choice with the settings `{a.probe}` of calibration-power.json; `probe, "
                "default grid`: its choice among the default grid's rules only." if a.probe else ""), "",
             "| set | policy | rules picked per seed | mean | vs NP | vs calibrated | share of OPPU's gain |",
             "|---|---|---|---|---|---|---|"]
    for name, s in sets.items():
        for policy, r in s["policies"].items():
            share = "-" if r["gain_share"] is None else f"{r['gain_share'] + 0:.0%}"
            vs, cal = r["vs_np"], r["vs_calibrated"]
            lines.append(f"| {name} | {policy} | {', '.join(s['picks'][policy])} | {r['mean']:.3f} | "
                         f"{vs['diff']:+.3f} (p={vs['p']:.2g}) | "
                         + ("" if policy == "calibrated" else f"{cal['diff']:+.3f} (p={cal['p']:.2g})")
                         + f" | {share} |")
    suite = [s for n, s in sets.items() if n not in POOL_CHECKS and s["oppu_beats_np"]]
    shares = {p: [s["policies"][p]["gain_share"] for s in suite] for p in POLICIES}
    lines += ["", "Mean share of OPPU's gain over the suite's sets where OPPU beats NP significantly: "
              + "; ".join(f"{p} {sum(v) / len(v):.1%}" for p, v in shares.items() if v) + "."]
    if covered := [s for s in suite if "probe" in s["policies"]]:  # the same sets for every policy
        names = [n for n, s in sets.items() if any(s is c for c in covered)]
        lines += ["", f"Over the sets the probe covered ({', '.join(names)}): " + "; ".join(
            f"{p} {np.mean([s['policies'][p]['gain_share'] for s in covered]):.1%}"
            for p in POLICIES + tuple(PROBE_POLICIES)) + "."]
    lines += ["", "Power of calibration's test to find the targets' best fixed rule, by validation queries per seed "
              f"(sign test, p times the number of rules < 0.05; {DRAWS} draws of the targets' wins, losses and ties); "
              "after the slash, the same rule named in advance and tested alone (p < 0.05), the most a test gives. "
              "`as good as oppu`: a rule with OPPU's wins, losses and ties against NP, on OPPU's queries:",
              "", "| set | targets' best rule | on the targets vs NP: wins / losses / ties (p) | at the queries used | "
              + " | ".join(f"{n} queries" for n in a.sizes) + " |", "|---|---|---|---|" + "---|" * len(a.sizes)]

    def cell(pw: dict, n: int) -> str:
        return f"{pw['power'][n]:.0%} / {pw['power_one_rule'][n]:.0%}"
    for name, pw in powers.items():
        vs, used = pw["vs_np"], pw["validation_queries_used"]
        lines.append(f"| {name} | {pw['rule']} | {vs['wins']} / {vs['losses']} / {vs['ties']} (p={vs['p']:.2g}) | "
                     f"{cell(pw, used)} ({used}) | " + " | ".join(cell(pw, n) for n in a.sizes) + " |")
    write_json(RESULTS / f"{a.out}.json", {"sets": sets, "power": powers})
    write_text(RESULTS / f"{a.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / (a.out + '.md')} and {RESULTS / (a.out + '.json')}")


if __name__ == "__main__":
    main()
