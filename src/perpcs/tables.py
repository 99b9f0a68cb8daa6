"""Every Markdown table perpcs writes: the bench's results.md (with calibration and mixing), the pooled
report.md and the curve's curve.md; `perpcs calibrate` prints `calibration_lines`."""

from __future__ import annotations

import json

from perpcs.methods import split_method
from perpcs.stats import REFERENCES, gain_share


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def results_table(r: dict) -> str:
    """The markdown table a person reads first: method x metrics x cost, with ratios to OPPU."""
    methods = r["methods"]
    metric_names = [k for k in next(iter(methods.values()))["metrics"] if k != "n"]
    primary = r["primary_metric"]["name"]
    oppu, base = methods.get("oppu"), methods.get("non_personalized")
    rag_pair = "rag" in methods and "oppu+rag" in methods
    head = ["method", *metric_names, "personalize s/user", "bytes/user"]
    if oppu:
        head += ["time vs OPPU", "storage vs OPPU"]
    if oppu and base:
        head.append("share of OPPU's gain")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    higher = r["primary_metric"]["higher_is_better"]
    shares = ({m: st["gain_share"] for m, st in r["statistics"]["methods"].items()} if "statistics" in r else
              {m: gain_share({k: v["metrics"][primary] for k, v in methods.items()}, m, higher) for m in methods})
    for name, m in methods.items():
        row = [name, *(f"{m['metrics'][k]:.4f}" for k in metric_names),
               f"{m['personalize_seconds_per_user']:.2f}", _fmt_bytes(m["bytes_per_user"])]
        kind = split_method(name)[0]
        if oppu:
            t, b = m["personalize_seconds_per_user"], m["bytes_per_user"]
            row += [f"{oppu['personalize_seconds_per_user'] / t:.1f}x less" if t and kind != "oppu" else "-",
                    f"{oppu['bytes_per_user'] / b:.0f}x less" if b and kind != "oppu" else "-"]
        if oppu and base:
            share = shares[name]
            row.append("-" if share is None else f"{share + 0.0:.0%}")  # + 0.0: no '-0%'
        lines.append("| " + " | ".join(row) + " |")
    o = r["one_time"]
    return "\n".join([
        f"# perpcs bench: {r['task']} ({r['kind']}), {r['n_targets']} target users, {r['n_queries']} queries, "
        f"{r['n_sharers']} sharers, seed {r['seed']}",
        "",
        f"Primary metric: {primary} ({'higher' if r['primary_metric']['higher_is_better'] else 'lower'} is better). "
        f"Base: {r['base_model']} on {r['machine']['device']}, {r['date']}."
        + (f" History budget of assembly: the {a['recent_k']} newest items"
           + (f", at most {a['budget_tokens']} tokens." if a.get("budget_tokens") else ".")
           if (a := r.get("config", {}).get("assembly")) else ""),
        "",
        *lines,
        *(["", "Share of OPPU's gain: from non_personalized to oppu" + ("; for methods with retrieval (+rag), "
               "from rag to oppu+rag" if rag_pair else "") + "; shown only where OPPU's gain is positive."]
          if oppu and base else []),
        *(["", f"OPPU ran on the first {r['oppu_targets']} targets only ({oppu['metrics']['n']} queries); "
               "every other method on all targets."] if oppu and r.get("oppu_targets") else []),
        "",
        f"One-time costs: task adaptation {o['task_adapt_seconds']:.0f} s, "
        f"sharer LoRAs {o['sharer_lora_seconds']:.0f} s, gates {o['gate_seconds']:.0f} s, "
        f"pool {_fmt_bytes(o['pool_bytes'])}; model loading {o['model_load_seconds']:.0f} s.",
        *([f"Known latent groups: {d['same_group_weight']:.0%} of the assembled weight comes from sharers of the "
           f"target's own group (random picking: {d['same_group_chance']:.0%})."]
          if (d := r.get("diagnostics")) and d["same_group_weight"] is not None else []),
        *([f"Timed alternately in one process for {len(a['users'])} targets (perpcs.costs, history budget "
           f"{a['history_budget']}): OPPU takes {a['time_ratio']['median']:.1f}x the time of Per-Pcs assembly "
           f"(median; min {a['time_ratio']['min']:.1f}x, max {a['time_ratio']['max']:.1f}x); its adapter "
           f"is {a['storage_ratio']['median']:.0f}x the recipe on disk."] if (a := r.get("alternating_costs")) else []),
        *(f"Variant {name}: {json.dumps(v['settings'])}, same task model and sharer LoRAs; piece keys "
          f"{v['gate_seconds']:.0f} s, pool {_fmt_bytes(v['pool_bytes'])}"
          + (f"; {v['diagnostics']['same_group_weight']:.0%} of its assembled weight from the target's own group."
             if v.get("diagnostics", {}).get("same_group_weight") is not None else ".")
          for name, v in r.get("variants", {}).items()),
        *(["", "![results: metric with CI against personalization seconds](results.png)",
           "![selection: assembled weight by sharer and layer, per target](selection.png)",
           *(f"![selection of variant {name}](selection-{name}.png)" for name in r.get("variants", {})),
           *statistics_lines(r)] if "statistics" in r else []),
        *(["", *mixing_lines(r["mixing"])] if "mixing" in r else []),
        *(["", *calibration_lines(c, c["cost"].get("other_key_pool_seconds"))] if (c := r.get("calibration")) else []),
        "",
    ])


def _num(x: float) -> str:
    return f"{x:.3f}"


def statistics_lines(r: dict) -> list[str]:
    """Markdown: each method's primary metric with its CI, then every method against the references."""
    s, primary = r["statistics"], r["primary_metric"]["name"]
    lower = "" if r["primary_metric"]["higher_is_better"] else " (lower is better: a negative difference is a gain)"
    lines = ["", f"## {primary} with {s['level']:.0%} CIs ({s['ci']}, seed {s['seed']})", "",
             f"| method | queries | {primary} | {s['level']:.0%} CI | share of OPPU's gain (OPPU's queries) |",
             "|---|---|---|---|---|"]
    for m, st in s["methods"].items():
        share = "-" if st["gain_share"] is None else f"{st['gain_share'] + 0.0:.0%}"
        lines.append(f"| {m} | {st['n']} | {_num(st['mean'])} | [{_num(st['ci'][0])}, {_num(st['ci'][1])}] | {share} |")
    lines += ["", f"Paired per query, on the queries both scored: wins / losses / ties of the row against the "
              f"reference, the {s['test']}, and the mean difference row - reference with its paired bootstrap "
              f"CI{lower}.", "",
              "| method | vs | queries | wins | losses | ties | p | difference | CI of difference |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, st in s["methods"].items():
        for ref, c in st["vs"].items():
            if c is not None:
                lines.append(f"| {m} | {ref} | {c['n']} | {c['wins']} | {c['losses']} | {c['ties']} | {c['p']:.2g} "
                             f"| {c['diff']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] |")
    return lines


def report_table(r: dict) -> str:
    """The pooled report's markdown: per-seed metric and costs, then the pooled statistics."""
    primary = r["primary_metric"]["name"]
    lines = [f"# perpcs report: {r['task']} ({r['kind']}), seeds {r['seeds']}, {r['n_queries']} queries pooled", "",
             f"Primary metric: {primary} ({'higher' if r['primary_metric']['higher_is_better'] else 'lower'} "
             f"is better). Runs: {', '.join(r['folders'])}. Comparisons with {', '.join(REFERENCES)} pair queries "
             "by (seed, query id).",
             "", "![results](report.png)", "",
             "| method | " + " | ".join(f"seed {s}" for s in r["seeds"]) + " | personalize s/user | bytes/user |",
             "|---|" + "---|" * (len(r["seeds"]) + 2)]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | " + " | ".join(_num(x) for x in v["per_seed"])
                     + f" | {v['personalize_seconds_per_user']:.2f} | {v['bytes_per_user']:.0f} |")
    if "same_group_weight" in r:
        lines += ["", "Own-group share of the assembled weight, by seed: " + "; ".join(
            f"{name} " + ", ".join("-" if w is None else f"{w:.0%}" for w in ws)
            for name, ws in r["same_group_weight"].items()) + "."]
    return "\n".join(lines + statistics_lines(r))


def curve_table(r: dict) -> str:
    primary = r["primary_metric"]["name"]
    lines = [f"# perpcs curve: {r['task']}, seed {r['seed']}", "",
             f"{primary} (95% bootstrap CI) when each target keeps only its newest k history items; points "
             "below 5 are the cold start. Without any history item a target gets the non-personalized model.", "",
             "![history curve](curve.png)", "",
             "| method | " + " | ".join(f"k = {p}" for p in r["points"]) + " |", "|---|" + "---|" * len(r["points"])]
    for m, by_point in r["methods"].items():
        lines.append(f"| {m} | " + " | ".join(
            f"{v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] (n {v['n']})" if (v := by_point.get(p)) else "-"
            for p in r["points"]) + " |")
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def calibration_lines(cal: dict, gate_seconds: float | None = None) -> list[str]:
    """The calibration table for results.md: every rule's validation metrics, CI, paired test against none."""
    metric = cal["metric"]
    if not cal["candidates"]:
        return [f"Calibration **declined**: {cal['reason']}. Targets get the task model."]
    names = [k for k in next(iter(cal["candidates"].values()))["metrics"] if k != "n"]
    v = cal["validation"]
    verdict = ("**declined**: no rule beat the non-personalized model; targets get the task model"
               if cal["declined"] else f"chose **{cal['chosen']}**" + (
                   "" if cal.get("best", cal["chosen"]) == cal["chosen"] else
                   f", the simplest of the rules that the paired test cannot tell from the best by {metric} "
                   f"({cal['best']}): " + ", ".join(cal["tied_with_best"])))
    lines = [f"Calibration on {len(v['users'])} validation users (sharer candidates that are not sharers), "
             f"{v['queries']} of their newest history items: {verdict}. Selection by {metric} "
             f"({'higher' if cal['higher_is_better'] else 'lower'} is better); a rule must beat none, paired, "
             f"Holm-corrected p < {cal['alpha']}. Cost {cal['cost']['seconds']:.0f} s "
             f"({cal['cost']['assembly_forwards']} assembly forwards, {cal['cost']['generations']} answers"
             + (f", {n} loss forwards" if (n := cal["cost"].get("loss_forwards")) else "") + ")"
             + (f", plus {gate_seconds:.0f} s of gate training for the rules with gate keys." if gate_seconds else ".")
             + (f" Carried over from an earlier calibration of this pool: {', '.join(r)}." if (
                 r := cal["cost"].get("reused")) else "")
             + "".join(f" Not a candidate: {n} ({why})." for n, why in cal.get("left_out", {}).items()),
             "", "| rule | " + " | ".join(names)
             + f" | 95% CI ({'per-query ' + metric if metric != 'f1' else 'accuracy'}) "
             "| distinct answers | vs none: diff [CI], p (Holm) | vs the best: p |", "|" + "---|" * (len(names) + 5)]
    for name, row in cal["candidates"].items():
        vs = row.get("vs_none")
        cmp = "-" if vs is None else f"{vs['diff']:+.4f} [{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}], {_num(vs['p_holm'])}"
        mark = f"**{name}**" if name == cal["chosen"] else name
        best = "best" if name == cal.get("best") else (_num(row["vs_best"]["p"]) if "vs_best" in row else "-")
        lines.append(f"| {mark} | " + " | ".join(f"{row['metrics'][k]:.4f}" for k in names)
                     + f" | [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] | {row.get('answers', '-')} | {cmp} | {best} |")
    return lines


def mixing_lines(stats: dict[str, dict]) -> list[str]:
    """One line per Per-Pcs row of a bench: how many sharers its recipes mix, and how much they differ."""
    lines = []
    for name, m in stats.items():
        eff = m["effective_sharers_mean"]
        lines.append(f"Mixing of {name}: {eff:.2f} effective sharers per position (exp entropy; 1 = one-hot), mean "
                     "over targets; spread between targets "
                     + ("n/a (one target)." if m["spread"] is None else
                        f"{m['spread']:.2f} (total variation from the average target; 0 = the same for all)."))
    return lines
