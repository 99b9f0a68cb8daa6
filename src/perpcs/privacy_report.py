"""How well an attack tells members from non-members, and the files `perpcs privacy` writes.

Every attack gives a score per candidate (higher: "member"). It is summarised as the MIA literature
asks (Carlini et al., "Membership Inference Attacks From First Principles", 2022): AUROC with a 95%
percentile-bootstrap CI (members and non-members resampled separately, seeded), and the TPR at 1%
FPR, the share of members caught when at most 1% of non-members are accused. With fewer than 100
non-members, 1% FPR means no false positive at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from perpcs.utils import atomic_path

FPR = 0.01


def tpr_at(y: np.ndarray, s: np.ndarray, fpr: float = FPR) -> float:
    """The highest TPR with FPR <= `fpr` on the ROC curve of labels y and scores s."""
    f, t, _ = roc_curve(y, s)
    return float(t[f <= fpr].max())


def roc(members, nonmembers, resamples: int = 1000, seed: int = 0) -> dict:
    """AUROC (with bootstrap CI) and TPR at 1% FPR of scores of members against non-members."""
    pos = np.asarray(members, dtype=np.float64)
    neg = np.asarray(nonmembers, dtype=np.float64)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) < 2 or len(neg) < 2:
        return {"auroc": math.nan, "ci": [math.nan, math.nan], "tpr_at_1pct_fpr": math.nan,
                "members": len(pos), "nonmembers": len(neg)}
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    rng = np.random.default_rng(seed)
    boot = [roc_auc_score(y, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(resamples)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    s = np.r_[pos, neg]
    return {"auroc": float(roc_auc_score(y, s)), "ci": [float(lo), float(hi)], "tpr_at_1pct_fpr": tpr_at(y, s),
            "members": len(pos), "nonmembers": len(neg)}


def _cell(r: dict | None) -> str:
    if not r or math.isnan(r["auroc"]):
        return "-"
    return f"{r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"


def _tpr(r: dict | None) -> str:
    return "-" if not r or math.isnan(r["tpr_at_1pct_fpr"]) else f"{r['tpr_at_1pct_fpr']:.3f}"


def _attribute(at: dict) -> str:
    if "skipped" in at:
        return f"skipped ({at['skipped']})"
    return f"dominant label right for {at['accuracy']:.0%} of sharers (most common label: {at['prior_accuracy']:.0%})"


def privacy_table(result: dict) -> str:
    """The markdown a person reads: one row per attack, with its never-saw-the-data reference beside it."""
    kp, lp = result.get("key_privacy"), result.get("lora_privacy")
    lines = [f"# perpcs privacy: {result['run']}", "",
             f"Pool keys: {result['key']}" + (f", DP noise: epsilon {kp['epsilon_per_key']:.3g} per key, "
                                              f"{kp['epsilon_all_keys']:.3g} for all {kp['positions']} keys, "
                                              f"delta {kp['delta']:g}" if kp else ", no DP noise")
             + (f"; sharer LoRAs by DP-SGD, epsilon {lp['epsilon']:.3g} (delta {lp['delta']:g})" if lp else "")
             + f". {result.get('n_attacked_sharers', result['n_sharers'])} of {result['n_sharers']} sharers attacked, "
               f"{result['n_targets']} targets, "
               f"{result['n_nonmember_items']} non-member items from {result['n_nonmember_users']} held-out users.",
             "", "| attack | members vs non-members | AUROC [95% CI] | TPR@1%FPR | reference AUROC "
                 "| reference TPR@1%FPR |", "|---|---|---|---|---|---|"]
    for name, a in result["attacks"].items():
        lines.append(f"| {name} | {a['what']} | {_cell(a['attack'])} | {_tpr(a['attack'])} | "
                     f"{_cell(a.get('reference'))} | {_tpr(a.get('reference'))} |")
    lines += ["", "Reference: the same attack on a model or key that never saw the members "
              "(see `reference` of each attack in privacy.json)."]
    if result.get("views"):
        names = ["key_membership", "key_membership_calibrated", "assembled_loss", "assembled_calibrated"]
        lines += ["", "Other pools of the same sharers and LoRAs (AUROC [95% CI] / TPR@1%FPR; reference AUROC):", "",
                  "| pool | keys | epsilon per key | " + " | ".join(names) + " | dominant label from keys |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for name, v in {"this run": result, **result["views"]}.items():
            kp = v.get("key_privacy")
            cells = [name, v["key"], f"{kp['epsilon_per_key']:.3g}" if kp else "inf"]
            cells += [f"{_cell(v['attacks'][n]['attack'])} / {_tpr(v['attacks'][n]['attack'])}; "
                      f"{_cell(v['attacks'][n].get('reference')).split(' ')[0]}" if n in v["attacks"] else "-"
                      for n in names]
            cells.append(_attribute(v["attribute"]))
            lines.append("| " + " | ".join(cells) + " |")
    at = result["attribute"]
    lines += ["", f"Attribute inference from keys: {_attribute(at)}" + ("" if "skipped" in at else
              f" ({at['labels']} labels, {at['sharers']} sharers; AUROC of 'this is the sharer's dominant label' "
              f"{_cell(at['roc'])}).")]
    return "\n".join(lines + ["", "![AUROC of each attack against its reference](privacy.png)", ""])


def privacy_plot(result: dict, path: str | Path) -> Path:
    """AUROC with CI per attack (dark) and its reference (light); 0.5 is chance."""
    names = list(result["attacks"])
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.2))
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        for shift, which, color in ((-0.15, "attack", "tab:red"), (0.15, "reference", "tab:gray")):
            r = result["attacks"][name].get(which)
            if r and not math.isnan(r["auroc"]):
                ax.errorbar(r["auroc"], i + shift, xerr=[[r["auroc"] - r["ci"][0]], [r["ci"][1] - r["auroc"]]],
                            fmt="o", color=color, label=which if i == 0 else None)
    ax.axvline(0.5, color="black", lw=0.8, ls=":")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC (95% bootstrap CI); 0.5 = chance")
    ax.set_title(f"{result['key']} keys" + (f", key_noise {result['key_privacy']['key_noise']:g}"
                                            if result.get("key_privacy") else ""))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
