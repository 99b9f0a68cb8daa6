"""Whether a gap between two methods is more than noise: per-query scores, bootstrap CIs, paired tests.

- Per-query score of the primary metric: `evaluation.per_query` (LaMP's rules: accuracy 0/1, absolute
  error with an unparsable answer at the farther end of the scale, ROUGE-1 F), so the mean of per-query
  scores is the bench's metric exactly.
- A method's 95% CI: percentile bootstrap of the mean over queries (scipy.stats.bootstrap, seeded).
- Method a against b, on the queries both scored: wins / losses / ties (in the better direction),
  the exact two-sided **sign test** on wins against losses (scipy.stats.binomtest), and the paired
  bootstrap CI of the mean difference a - b. The sign test rather than Wilcoxon: on accuracy every
  untied difference is +-1, where signed ranks add nothing to the sign; and it assumes nothing about
  the scale of ROUGE or absolute-error differences. The CI of the difference says how large a gap is.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import binomtest, bootstrap

from perpcs.methods import split_method

LEVEL = 0.95
RESAMPLES = 10_000
# every method is compared, query by query, with these
REFERENCES = ("non_personalized", "peft_retrieval", "oppu")


def bootstrap_ci(values, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of the mean of `values` (a single value or constant values: that value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if not len(v):
        raise ValueError("no values to bootstrap")
    if np.ptp(v) == 0:
        return float(v[0]), float(v[0])
    ci = bootstrap((v,), np.mean, n_resamples=RESAMPLES, confidence_level=LEVEL, method="percentile",
                   vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def paired(a: Mapping[str, float], b: Mapping[str, float], higher: bool, seed: int = 0) -> dict | None:
    """a against b on the queries both scored (None if none): wins (a better), losses, ties, the sign
    test's p-value, and the mean difference a - b with its paired bootstrap CI."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diff = np.array([a[q] - b[q] for q in common])
    better = diff if higher else -diff
    wins, losses = int((better > 0).sum()), int((better < 0).sum())
    lo, hi = bootstrap_ci(diff, seed)
    return {"n": len(common), "wins": wins, "losses": losses, "ties": len(common) - wins - losses,
            "p": float(binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0,
            "diff": float(diff.mean()), "ci": [lo, hi]}


def gain_share(means: Mapping[str, float], name: str, higher: bool = True) -> float | None:
    """The share of OPPU's gain over non_personalized that `name` reaches (means of the primary metric on
    the same queries); a row with retrieval (+rag) is measured from rag to oppu+rag when both ran.
    None unless OPPU's gain is positive: a share of a loss reads as success for a method worse than both."""
    lo, hi = "non_personalized", "oppu"
    if split_method(name)[1] and "rag" in means and "oppu+rag" in means:
        lo, hi = "rag", "oppu+rag"
    if lo not in means or hi not in means:
        return None
    sign = 1 if higher else -1
    gain = sign * (means[hi] - means[lo])
    return sign * (means[name] - means[lo]) / gain if gain > 0 else None


def method_statistics(scores: Mapping[str, Mapping[str, float]], higher: bool, seed: int = 0) -> dict:
    """Per method: n, mean, CI, paired comparisons with each reference that ran, and the share of OPPU's
    gain measured on the queries OPPU scored (OPPU may run on a subset of the targets)."""
    oppu_queries = sorted(scores.get("oppu", {}))  # sorted: a set's order would change the sums' last bits
    subset = {m: float(np.mean([s[q] for q in oppu_queries])) for m, s in scores.items()
              if oppu_queries and set(oppu_queries) <= set(s)}
    out = {}
    for m, s in scores.items():
        lo, hi = bootstrap_ci(s.values(), seed)
        out[m] = {"n": len(s), "mean": float(np.mean(list(s.values()))), "ci": [lo, hi],
                  "vs": {ref: paired(s, scores[ref], higher, seed) for ref in REFERENCES if ref in scores and ref != m},
                  "gain_share": gain_share(subset, m, higher) if m in subset else None}
    return out
